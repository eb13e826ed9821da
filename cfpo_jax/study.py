"""`python -m cfpo_jax.study --config=<base config> --study=<study file> [--parallel=N] [--plot-only]`.

A stability study in the paper's sense: the same task trained with each objective (CFPO, and
`ppo` — GRPO when the base config's `rl.estimator` is `grpo`) at each number of epochs per rollout
batch μ (`rl.num_epochs`), each batch ratio (`rl.num_minibatches`) and each seed. Every cell is an
ordinary training run, `python -m cfpo_jax.train --config=<base> --workdir=<dir>/runs/<name>
--config.rl.objective=... ...`, in its own workdir; its exact command is in `<run>/command.sh`, its
console output in `<run>/train.log`.

Decisions written down here:
  * A run counts as finished when its process exited 0 and its metrics.jsonl reaches
    `train.num_steps`; `<run>/finished.json` then records its wall time and it is never run again.
    Anything else is (re)started, and the trainer resumes it from its latest checkpoint. So a
    killed study resumes with the same command. The study forwards SIGTERM/SIGINT to its runs
    (they checkpoint and stop) and, on Linux, asks the kernel to SIGTERM them if the study itself
    dies, so no orphan keeps writing into a workdir a resumed study reuses.
  * A seed sets both `seed` (initialisation, warm start, sampling) and `data.seed` (prompt order).
  * Collapse is `collapse(...)` below; its thresholds are the study file's `collapse` section.
  * A resumed run appends to metrics.jsonl; the records of the re-run steps replace the earlier
    ones (the last record of a step wins).
  * "final" reward is the mean reward of the last `collapse.window` steps, "best" the highest such
    window mean anywhere in the run; the late-run means are over the last `late_fraction` of steps.
    Spreads are the sample standard deviation over seeds. Only finished runs enter the means and
    the curves; unfinished ones are listed with their step count.

Outputs: `<dir>/report.md` (the table, per-run rows, the collapse rule, the plots) and
`<dir>/{reward,entropy,ratio_dev,clip_frac}.png` — one panel per μ (a row per batch ratio), each
objective's mean over seeds with a band from the lowest to the highest seed, smoothed over
`collapse.window` steps. `--plot-only` rebuilds report and plots from the runs on disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cfpo_jax import config as config_lib

PLOTTED = ("reward_mean", "entropy", "ratio_dev", "clip_frac")
LATE_METRICS = ("clip_frac", "ratio_dev", "ppo_kl", "entropy", "grad_norm", "response_len_mean")


# ============================================================================ collapse


def collapse(reward, entropy, skipped_updates, *, delta: float, window: int,
             entropy_floor: float) -> tuple[int, str] | None:
    """The first step index (0-based, into the per-step arrays) at which a run counts as collapsed,
    with the reason, or None.

    reward, entropy: per-step means; skipped_updates: the trainer's running count of optimiser
    updates refused for a non-finite loss or gradient. A run collapses at the earliest of:
      * "reward": the mean reward over the last `window` steps falls more than `delta` below the
        best such window mean seen so far (a drawdown; counted even if the run recovers later —
        the final-reward column shows whether it did). Only full windows count.
      * "entropy": the mean entropy over the last `window` steps falls below `entropy_floor`.
      * "non-finite": a reward that is not finite, or an increase of skipped_updates.
    """
    reward = np.asarray(reward, np.float64)
    entropy = np.asarray(entropy, np.float64)
    skipped = np.asarray(skipped_updates, np.float64)
    events = []
    bad = ~np.isfinite(reward) | (np.diff(skipped, prepend=0.0) > 0)
    if bad.any():
        events.append((int(np.argmax(bad)), "non-finite"))
    reward_w = _window_means(np.where(np.isfinite(reward), reward, 0.0), window)
    if reward_w.size:
        drawdown = np.maximum.accumulate(reward_w) - reward_w
        if (drawdown > delta).any():
            events.append((int(np.argmax(drawdown > delta)) + window - 1, "reward"))
    entropy_w = _window_means(entropy, window)
    if entropy_w.size and (entropy_w < entropy_floor).any():
        events.append((int(np.argmax(entropy_w < entropy_floor)) + window - 1, "entropy"))
    return min(events) if events else None


def _window_means(x, window: int):
    """Means of x[i - window + 1 : i + 1] for i = window - 1, ..., len(x) - 1."""
    x = np.asarray(x, np.float64)
    if len(x) < window:
        return np.zeros(0)
    cumsum = np.concatenate([[0.0], np.cumsum(x)])
    return (cumsum[window:] - cumsum[:-window]) / window


# ============================================================================ the grid


@dataclasses.dataclass(frozen=True)
class Cell:
    objective: str
    num_epochs: int
    num_minibatches: int

    def label(self, estimator: str) -> str:
        if self.objective == "cfpo":
            return "CFPO"
        return "GRPO" if estimator == "grpo" else self.objective.upper()


@dataclasses.dataclass(frozen=True)
class Run:
    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        c = self.cell
        return f"{c.objective}_mu{c.num_epochs}_mb{c.num_minibatches}_seed{self.seed}"

    def overrides(self) -> dict:
        c = self.cell
        return {"rl.objective": c.objective, "rl.num_epochs": c.num_epochs,
                "rl.num_minibatches": c.num_minibatches, "seed": self.seed, "data.seed": self.seed}


def _flatten(section: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in section.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _flag_value(value) -> str:
    return repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


@dataclasses.dataclass
class Study:
    """A study file's settings together with the base training config they apply to.

    spec: the study file's ConfigDict; base: the base training config (command-line overrides
    applied); base_file: its `path[:arg]`; cli_overrides: the `--config.a.b=v` values given to the
    study, which every run gets too (over the study file's `overrides`, under the swept fields).
    """

    spec: ml_collections.ConfigDict
    base: ml_collections.ConfigDict
    base_file: str
    study_file: str = ""
    cli_overrides: dict = dataclasses.field(default_factory=dict)

    @property
    def output_dir(self) -> str:
        return self.spec.output_dir

    @property
    def estimator(self) -> str:
        return self.base.rl.estimator

    def runs(self) -> list[Run]:
        """Every run, seeds outermost, so the first seed of every cell comes first."""
        s = self.spec
        cells = [Cell(o, e, m) for e in s.num_epochs for m in s.num_minibatches for o in s.objectives]
        return [Run(c, seed) for seed in s.seeds for c in cells]

    def workdir(self, run: Run) -> str:
        return os.path.join(self.output_dir, "runs", run.name)

    def overrides(self, run: Run) -> dict:
        return {**_flatten(self.spec.overrides), **self.cli_overrides, **run.overrides()}

    def config(self, run: Run) -> ml_collections.ConfigDict:
        """The full training config of one run, validated."""
        config = self.base.copy_and_resolve_references()
        with config.unlocked():
            for path, value in self.overrides(run).items():
                *sections, key = path.split(".")
                node = config
                for section in sections:
                    node = node.get(section)
                    if not isinstance(node, ml_collections.ConfigDict):
                        break
                if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                    raise ValueError(f"study override {path!r}: the training config has no such field")
                node[key] = value
        config_lib.validate(config)
        return config

    def command(self, run: Run) -> list[str]:
        """`python -m cfpo_jax.train ...` for one run: the base config file and every override."""
        return [sys.executable, "-m", "cfpo_jax.train", f"--config={self.base_file}",
                f"--workdir={self.workdir(run)}",
                *(f"--config.{k}={_flag_value(v)}" for k, v in self.overrides(run).items())]


# ============================================================================ running


def read_metrics(workdir: str) -> dict[int, dict]:
    """Records of `<workdir>/metrics.jsonl` by step (the last training record of a step wins, so
    a resumed run's re-run steps replace the killed run's); evaluation records (`eval/` keys) are
    merged into their step."""
    path = os.path.join(workdir, "metrics.jsonl")
    records: dict[int, dict] = {}
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            step = int(record.pop("step"))
            if any(k.startswith("eval/") for k in record):
                records.setdefault(step, {}).update(record)
            else:
                evals = {k: v for k, v in records.get(step, {}).items() if k.startswith("eval/")}
                records[step] = {**record, **evals}
    return records


def _finished_file(workdir: str) -> str:
    return os.path.join(workdir, "finished.json")


def _set_parent_death_signal():
    """Runs in the child before exec: SIGTERM it when the study process dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_all(study: Study, parallel: int, log=print) -> None:
    """Runs every unfinished run of the study, `parallel` at a time; raises if one fails."""
    runs = study.runs()
    num_steps = {run: study.config(run).train.num_steps for run in runs}  # validates them all first
    pending = [r for r in runs if not os.path.exists(_finished_file(study.workdir(r)))]
    log(f"study: {len(runs)} runs, {len(runs) - len(pending)} already finished, "
        f"{len(pending)} to run, {parallel} at a time")
    # The children import this same copy of cfpo_jax, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    active: dict[subprocess.Popen, tuple[Run, float, object]] = {}

    def stop_children(signum, frame):
        for proc in active:
            proc.send_signal(signal.SIGTERM)
        for proc in active:
            proc.wait()
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop_children) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or active:
            while pending and len(active) < parallel:
                run = pending.pop(0)
                workdir = study.workdir(run)
                os.makedirs(workdir, exist_ok=True)
                command = study.command(run)
                with open(os.path.join(workdir, "command.sh"), "w") as f:
                    f.write(shlex.join(command) + "\n")
                logfile = open(os.path.join(workdir, "train.log"), "a")
                proc = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_set_parent_death_signal)
                active[proc] = (run, time.time(), logfile)
                log(f"start {run.name}")
            time.sleep(0.2)
            for proc in [p for p in active if p.poll() is not None]:
                run, started, logfile = active.pop(proc)
                logfile.close()
                workdir = study.workdir(run)
                steps = max((s for s, r in read_metrics(workdir).items() if "reward_mean" in r),
                            default=0)
                if proc.returncode != 0 or steps < num_steps[run]:
                    raise RuntimeError(
                        f"run {run.name} stopped at step {steps}/{num_steps[run]} with exit code "
                        f"{proc.returncode}; see {workdir}/train.log")
                wall_s = time.time() - started
                with open(_finished_file(workdir), "w") as f:
                    json.dump({"wall_s": wall_s}, f)
                log(f"done  {run.name} in {wall_s:.0f} s")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ============================================================================ report


@dataclasses.dataclass
class RunSummary:
    run: Run
    steps: int
    final: float
    best: float
    collapse: tuple[int, str] | None  # (step, reason), step 1-based as in metrics.jsonl
    late: dict
    eval: float | None
    wall_s: float | None


def summarize(run: Run, records: dict[int, dict], spec: ml_collections.ConfigDict,
              wall_s=None) -> RunSummary:
    """One run's numbers for the tables; `spec` is the study file's config."""
    steps = sorted(s for s, r in records.items() if "reward_mean" in r)
    col = lambda key: np.array([_number(records[s].get(key)) for s in steps])
    reward = col("reward_mean")
    c = spec.collapse
    reward_w = _window_means(reward, min(c.window, len(reward)) or 1)
    event = collapse(reward, col("entropy"), col("skipped_updates"), delta=c.delta,
                     window=c.window, entropy_floor=c.entropy_floor)
    late_n = max(int(round(len(steps) * spec.late_fraction)), 1)
    late = {k: float(np.mean(col(k)[-late_n:])) for k in LATE_METRICS}
    evals = [records[s][spec.eval_metric] for s in sorted(records)
             if spec.eval_metric and spec.eval_metric in records[s]]
    return RunSummary(
        run=run, steps=len(steps),
        final=float(reward_w[-1]) if reward_w.size else math.nan,
        best=float(reward_w.max()) if reward_w.size else math.nan,
        collapse=None if event is None else (steps[event[0]], event[1]),
        late=late, eval=_number(evals[-1]) if evals else None, wall_s=wall_s)


def _number(value) -> float:
    try:
        return float(value)  # "nan"/"inf" strings, as the writer stores them, included
    except (TypeError, ValueError):
        return math.nan


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _collapse_cell(summaries) -> str:
    hits = [s.collapse for s in summaries if s.collapse is not None]
    if not hits:
        return "none"
    shown = ", ".join(f"{step} ({reason})" for step, reason in hits)
    return f"{len(hits)}/{len(summaries)}: {shown}"


def report_table(summaries: list[RunSummary], estimator: str, with_eval: bool) -> str:
    """The markdown table: one row per objective × μ × batch ratio, over seeds."""
    header = ["objective", "μ", "batch ratio", "seeds", "final reward", "best reward", "collapse step",
              "clip_frac", "ratio_dev", "ppo_kl", "entropy", "grad_norm", "response len"]
    if with_eval:
        header.insert(6, "held-out")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = sorted({s.run.cell for s in summaries},
                   key=lambda c: (c.num_epochs, c.num_minibatches, c.objective != "cfpo", c.objective))
    for cell in cells:
        group = sorted((s for s in summaries if s.run.cell == cell), key=lambda s: s.run.seed)
        row = [cell.label(estimator), str(cell.num_epochs), str(cell.num_minibatches), str(len(group)),
               _mean_std([s.final for s in group]), _mean_std([s.best for s in group])]
        if with_eval:
            row.append(_mean_std([s.eval for s in group]))
        row.append(_collapse_cell(group))
        row += [_mean_std([s.late[k] for s in group]) for k in LATE_METRICS]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def runs_table(summaries: list[RunSummary], estimator: str) -> str:
    rows = ["| run | objective | μ | batch ratio | seed | steps | final | best | collapse | wall time |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (s.run.cell.num_epochs, s.run.cell.num_minibatches,
                                              s.run.cell.objective, s.run.seed)):
        c = s.run.cell
        event = "none" if s.collapse is None else f"{s.collapse[0]} ({s.collapse[1]})"
        wall = "—" if s.wall_s is None else f"{s.wall_s:.0f} s"
        rows.append(f"| {s.run.name} | {c.label(estimator)} | {c.num_epochs} | {c.num_minibatches} | "
                    f"{s.run.seed} | {s.steps} | {s.final:.3f} | {s.best:.3f} | {event} | {wall} |")
    return "\n".join(rows)


def write_report(study: Study, plot: bool = True) -> str:
    """Reads every run of the study on disk, writes report.md (and the plots); returns its text."""
    spec, c = study.spec, study.spec.collapse
    summaries, curves = [], {}
    for run in study.runs():
        workdir = study.workdir(run)
        records = read_metrics(workdir)
        if not any("reward_mean" in r for r in records.values()):
            continue
        wall = None
        if os.path.exists(_finished_file(workdir)):
            with open(_finished_file(workdir)) as f:
                wall = json.load(f)["wall_s"]
        summaries.append(summarize(run, records, spec, wall))
        curves[run] = records
    # Means over seeds and curves take finished runs only: a run cut short would mix its early
    # steps into "final". Unfinished runs are listed with their step count below.
    finished = [s for s in summaries if s.wall_s is not None]
    curves = {run: records for run, records in curves.items()
              if any(s.run == run for s in finished)}
    lines = [
        f"# Stability study: {spec.name}",
        "",
        f"Base config `{study.base_file}`; {len(study.runs())} runs, {len(finished)} finished"
        + (f", {len(summaries) - len(finished)} unfinished (in the runs list only)"
           if len(summaries) > len(finished) else "") + ". Command:",
        "",
        "```",
        f"python -m cfpo_jax.study --config={study.base_file} --study={study.study_file}"
        + "".join(f" --config.{k}={_flag_value(v)}" for k, v in study.cli_overrides.items()),
        "```",
        "",
        "One row per objective × μ (epochs per rollout batch, `rl.num_epochs`) × batch ratio "
        "(`rl.num_minibatches`), mean ± sample std over seeds. *final* / *best reward*: the mean "
        f"reward of the last {c.window} steps / of the best {c.window}-step window. *collapse "
        f"step*: collapsed seeds and the step of each (`cfpo_jax.study.collapse`: the "
        f"{c.window}-step mean reward drops more than δ = {c.delta} below its best so far, the "
        f"{c.window}-step mean entropy falls below {c.entropy_floor}, or an update is non-finite)."
        + (f" *held-out*: `{spec.eval_metric}` at the end of training." if spec.eval_metric else "")
        + f" The last six columns are means over the last {spec.late_fraction:.0%} of steps; for "
        "CFPO, clip_frac is the fraction PPO *would* clip.",
        "",
        report_table(finished, study.estimator, with_eval=bool(spec.eval_metric)),
        "",
    ]
    if plot and finished:
        names = plot_curves(study, curves)
        lines += ["## Curves", "",
                  f"Mean over seeds with a band from the lowest to the highest seed, each seed "
                  f"smoothed over {c.window} steps.", ""]
        lines += [f"![{n}]({n}.png)" for n in names] + [""]
    lines += ["## Runs", "", "Wall time: of the study invocation that finished the run (— : "
              "unfinished).", "",
              runs_table(summaries, study.estimator), ""]
    text = "\n".join(lines)
    os.makedirs(study.output_dir, exist_ok=True)
    with open(os.path.join(study.output_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def plot_curves(study: Study, curves: dict) -> list[str]:
    """One PNG per metric in PLOTTED, a panel per μ (columns) and batch ratio (rows); returns the
    file names without extension."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the study's plots need matplotlib: pip install 'cfpo_jax[study]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, estimator = study.spec, study.estimator
    epochs, ratios = list(spec.num_epochs), list(spec.num_minibatches)
    colors = {"cfpo": "tab:blue", "ppo": "tab:red"}
    names = []
    for metric in PLOTTED:
        fig, axes = plt.subplots(len(ratios), len(epochs), squeeze=False, sharey=True,
                                 figsize=(3.6 * len(epochs), 2.8 * len(ratios)))
        for i, ratio in enumerate(ratios):
            for j, mu in enumerate(epochs):
                ax = axes[i][j]
                for objective in spec.objectives:
                    seeds = [records for run, records in curves.items() if run.cell ==
                             Cell(objective, mu, ratio)]
                    smoothed = []
                    for records in seeds:
                        steps = sorted(s for s, r in records.items() if metric in r)
                        values = np.array([_number(records[s][metric]) for s in steps])
                        w = min(spec.collapse.window, len(values))
                        if w:
                            smoothed.append((np.array(steps[w - 1:]), _window_means(values, w)))
                    if not smoothed:
                        continue
                    n = min(len(v) for _, v in smoothed)
                    x = smoothed[0][0][:n]
                    y = np.stack([v[:n] for _, v in smoothed])
                    label = Cell(objective, mu, ratio).label(estimator)
                    color = colors.get(objective)
                    ax.plot(x, y.mean(0), color=color, label=f"{label} ({len(smoothed)} seed{'s' * (len(smoothed) > 1)})")
                    ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.2, linewidth=0)
                ax.set_title(f"μ = {mu}" + (f", batch ratio {ratio}" if len(ratios) > 1 else ""))
                ax.set_xlabel("RL step")
                if j == 0:
                    ax.set_ylabel(metric)
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="small")
        fig.tight_layout()
        name = "reward" if metric == "reward_mean" else metric
        fig.savefig(os.path.join(study.output_dir, f"{name}.png"), dpi=100)
        plt.close(fig)
        names.append(name)
    return names


# ============================================================================ command line


def _define_flags():
    """The command's flags, defined only when run as a program: the trainer defines its own
    --config, and tests import both modules into one process."""
    config_flags.DEFINE_config_file(
        "config", None, "Base training config file[:arg]; --config.a.b=v overrides reach every run.",
        lock_config=True)
    config_flags.DEFINE_config_file("study", None, "Study file (configs/studies/*.py).",
                                    lock_config=True)
    flags.DEFINE_integer("parallel", 1, "Training runs at a time.")
    flags.DEFINE_bool("plot-only", False, "Only rebuild report.md and plots from the runs on disk.")


def main(argv):
    del argv
    args = flags.FLAGS
    base, spec, parallel = args.config, args.study, args.parallel
    if base is None or spec is None:
        sys.exit("error: give --config=<base training config> and --study=<study file> "
                 "(see configs/studies/)")
    study = Study(spec=spec, base=base,
                  base_file=config_flags.get_config_filename(flags.FLAGS["config"]),
                  study_file=config_flags.get_config_filename(flags.FLAGS["study"]),
                  cli_overrides=config_flags.get_override_values(flags.FLAGS["config"]))
    try:
        if parallel < 1:
            raise ValueError(f"--parallel must be >= 1; got {parallel}")
        for run in study.runs():
            study.config(run)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not args["plot-only"].value:
        started = time.time()
        run_all(study, parallel, log=lambda m: print(m, flush=True))
        print(f"study: every run finished ({time.time() - started:.0f} s in this invocation)",
              flush=True)
    write_report(study)
    print(f"report: {os.path.join(study.output_dir, 'report.md')}", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
