"""`python -m cfpo_jax.study --config=<base config> --study=<study file> [--parallel=N] [--plot-only]`.

A stability study in the paper's sense: the same task trained over a grid of config values —
typically each objective (CFPO, and `ppo` — GRPO when `rl.estimator` is `grpo`) × the number of
epochs per rollout batch μ (`rl.num_epochs`) × the learning rate — and seeds. Every axis is a
field of the training config, named by its path in the study file (`axes.rl.num_epochs = (1, 8)`,
`axes.optim.lr = (7e-4, 1.5e-3)`, `axes.model.path = (...)`; see `axes_of`); the grid is every
combination, except for axes the study file links (`linked = (("rl.a", "rl.b"),)`: their values go
in step, the i-th with the i-th). Every run is an
ordinary training run, `python -m cfpo_jax.train --config=<base> --workdir=<dir>/runs/<name>
--config.rl.objective=... ...`, in its own workdir, named after its values
(`cfpo_lr0.0015_mu8_seed0`); its exact command is in `<run>/command.sh`, its console output in
`<run>/train.log`.

Decisions written down here:
  * A run counts as finished when its process exited 0 and its metrics.jsonl reaches
    `train.num_steps`; `<run>/finished.json` then records its wall time and it is never run again.
    Anything else is (re)started, and the trainer resumes it from its latest checkpoint. So a
    killed study resumes with the same command. The study forwards SIGTERM/SIGINT to its runs
    (they checkpoint and stop) and, on Linux, asks the kernel to SIGTERM them if the study itself
    dies, so no orphan keeps writing into a workdir a resumed study reuses.
  * A seed sets both `seed` (initialisation, warm start, sampling) and `data.seed` (prompt order).
  * Collapse and transient dips are `cfpo_jax.stability.outcome`; its thresholds are the study
    file's `collapse` section.
  * A resumed run appends to metrics.jsonl; the records of the re-run steps replace the earlier
    ones (the last record of a step wins).
  * "final" reward is the mean reward of the last `collapse.window` steps, "best" the highest such
    window mean anywhere in the run; the late-run means are over the last `late_fraction` of steps.
    Spreads are the sample standard deviation over seeds. Only finished runs enter the means, the
    map and the curves; unfinished ones are listed with their step count, and a report of a study
    not yet complete says so at the top.

Outputs: `<dir>/report.md` (the table, the map when the study file has `map.x`/`map.y`, per-run
rows, the collapse rule, the plots), `<dir>/map*.png` (`cfpo_jax.stability.plot_map`) and
`<dir>/{reward,entropy,ratio_dev,clip_frac}.png` — a line per objective (mean over seeds with a
band from the lowest to the highest seed, smoothed over `collapse.window` steps), a panel per
value of the other axes. `--plot-only` rebuilds report and plots from the runs on disk.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
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
from cfpo_jax import stability

PLOTTED = ("reward_mean", "entropy", "ratio_dev", "clip_frac")
LATE_METRICS = ("clip_frac", "ratio_dev", "ppo_kl", "entropy", "grad_norm", "response_len_mean")


# ============================================================================ the grid

# Short names of axes in run names ("" = the value alone) and their titles in tables and plots;
# any other axis is named by its last path component and titled by its path.
AXIS_NAMES = {"rl.objective": "", "rl.num_epochs": "mu", "rl.num_minibatches": "mb"}
AXIS_TITLES = {"rl.objective": "objective", "rl.num_epochs": "μ", "rl.num_minibatches": "batch ratio"}
OBJECTIVE = "rl.objective"


@dataclasses.dataclass(frozen=True)
class Axis:
    path: str  # a field of the training config, e.g. "optim.lr"
    values: tuple

    @property
    def title(self) -> str:
        return AXIS_TITLES.get(self.path, self.path)

    def name(self, value) -> str:
        """The run-name part of one value: prefix and value, safe as a directory name."""
        prefix = AXIS_NAMES.get(self.path, self.path.rsplit(".", 1)[-1])
        return prefix + re.sub(r"[^A-Za-z0-9.+-]+", "-", _text(value)).strip("-")


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def axes_of(spec: ml_collections.ConfigDict) -> list[Axis]:
    """The study file's axes: `spec.axes` mirrors the config tree (`axes.rl.num_epochs = (1, 8)`,
    `axes.optim.lr = (7e-4, 1.5e-3)`), each leaf a tuple of values. Order (of run names and table
    columns): rl.objective first, then by path. A study file of the last round (`objectives`,
    `num_epochs`, `num_minibatches` at the top) is read as the same three axes, so its runs keep
    their names (`cfpo_mu8_mb1_seed0`) and a study it started resumes."""
    if "axes" in spec:
        flat = _flatten(spec.axes)
    elif "objectives" in spec:
        flat = {OBJECTIVE: spec.objectives, "rl.num_epochs": spec.num_epochs,
                "rl.num_minibatches": spec.num_minibatches}
    else:
        raise ValueError("the study file names no axes: set `axes` (e.g. axes.rl.num_epochs = (1, 8))")
    axes = []
    for path, values in sorted(flat.items(), key=lambda kv: (kv[0] != OBJECTIVE, kv[0])):
        if path in ("seed", "data.seed"):
            raise ValueError(f"study axis {path!r}: seeds are the study file's `seeds`, not an axis")
        if not isinstance(values, (tuple, list)) or not values or len(set(values)) != len(values):
            raise ValueError(f"study axis {path!r}: give a tuple of distinct values; got {values!r}")
        axes.append(Axis(path, tuple(values)))
    return axes


@dataclasses.dataclass(frozen=True)
class Run:
    cell: tuple  # ((axis path, value), ...) in axis order
    seed: int
    name: str

    def value(self, path: str, default=None):
        return dict(self.cell).get(path, default)


def _objective_label(objective: str, estimator: str) -> str:
    if objective == "cfpo":
        return "CFPO"
    return "GRPO" if objective == "ppo" and estimator == "grpo" else objective.upper()


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
    study, which every run gets too (over the study file's `overrides`, under the axes).
    """

    spec: ml_collections.ConfigDict
    base: ml_collections.ConfigDict
    base_file: str
    study_file: str = ""
    cli_overrides: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.axes = axes_of(self.spec)

    @property
    def output_dir(self) -> str:
        return self.spec.output_dir

    def axis(self, path: str) -> Axis | None:
        return next((a for a in self.axes if a.path == path), None)

    def _groups(self) -> list[list[Axis]]:
        """The axes grouped as they vary: alone, or together with the axes they are linked to
        (`spec.linked`: tuples of axis paths whose values go in step — the i-th value of each —
        e.g. a ratio reference with the correction that belongs to it)."""
        linked = [tuple(group) for group in self.spec.get("linked", ())]
        groups, placed = [], set()
        for group in linked:
            axes = [self.axis(path) for path in group]
            missing = [path for path, axis in zip(group, axes) if axis is None]
            if missing or len(group) < 2:
                raise ValueError(f"study `linked` group {group!r}: give two or more of the axes "
                                 f"({', '.join(a.path for a in self.axes)}); not axes: {missing}")
            if len({len(axis.values) for axis in axes}) != 1:
                raise ValueError(f"study `linked` group {group!r}: linked axes need as many values "
                                 f"each; got {[len(axis.values) for axis in axes]}")
            if placed & set(group):
                raise ValueError(f"study `linked` group {group!r}: an axis is in two groups")
            placed |= set(group)
            groups.append(axes)
        return groups + [[a] for a in self.axes if a.path not in placed]

    def runs(self) -> list[Run]:
        """Every run, seeds outermost (the first seed of every cell comes first), then the axes
        with the objective fastest, so the objectives of a cell run side by side; linked axes
        (`spec.linked`) take their values in step instead of every combination."""
        groups = self._groups()
        groups.sort(key=lambda g: any(a.path == OBJECTIVE for a in g))
        runs, names = [], set()
        for seed in self.spec.seeds:
            for combo in itertools.product(*(range(len(g[0].values)) for g in groups)):
                chosen = {a.path: a.values[i] for g, i in zip(groups, combo) for a in g}
                cell = tuple((a.path, chosen[a.path]) for a in self.axes)
                name = "_".join([*(a.name(chosen[a.path]) for a in self.axes), f"seed{seed}"])
                if name in names:
                    raise ValueError(f"two runs of the study would share the name {name!r}; "
                                     "give the axes values that differ in their text")
                names.add(name)
                runs.append(Run(cell, seed, name))
        return runs

    def label(self, run: Run) -> str:
        """The run's objective as the report names it (GRPO = ppo with grpo advantages)."""
        return _objective_label(run.value(OBJECTIVE, self.base.rl.objective),
                                run.value("rl.estimator", self.base.rl.estimator))

    def workdir(self, run: Run) -> str:
        return os.path.join(self.output_dir, "runs", run.name)

    def overrides(self, run: Run) -> dict:
        return {**_flatten(self.spec.overrides), **self.cli_overrides, **dict(run.cell),
                "seed": run.seed, "data.seed": run.seed}

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
    dips: tuple[tuple[int, str], ...]  # the same, for each recovered dip
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
    reward_w = stability.window_means(reward, min(c.window, len(reward)) or 1)
    found = stability.outcome(reward, col("entropy"), col("skipped_updates"), delta=c.delta,
                              window=c.window, entropy_floor=c.entropy_floor)
    late_n = max(int(round(len(steps) * spec.late_fraction)), 1)
    late = {k: float(np.mean(col(k)[-late_n:])) for k in LATE_METRICS}
    evals = [records[s][spec.eval_metric] for s in sorted(records)
             if spec.eval_metric and spec.eval_metric in records[s]]
    return RunSummary(
        run=run, steps=len(steps),
        final=float(reward_w[-1]) if reward_w.size else math.nan,
        best=float(reward_w.max()) if reward_w.size else math.nan,
        collapse=None if found.collapse is None else (steps[found.collapse[0]], found.collapse[1]),
        dips=tuple((steps[i], reason) for i, reason in found.dips),
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


def _events_cell(events_per_seed) -> str:
    """`k/n: step (reason), ...` over the seeds with an event, or `none`."""
    hits = [events[0] for events in events_per_seed if events]
    if not hits:
        return "none"
    shown = ", ".join(f"{step} ({reason})" for step, reason in hits)
    return f"{len(hits)}/{len(events_per_seed)}: {shown}"


def _row_key(study: Study):
    """Rows and runs in axis order, the objective varying fastest (its rows side by side)."""
    others = [a for a in study.axes if a.path != OBJECTIVE]
    objective = study.axis(OBJECTIVE)
    return lambda run: (tuple(a.values.index(run.value(a.path)) for a in others),
                        objective.values.index(run.value(OBJECTIVE)) if objective else 0)


def _axis_cells(study: Study, run: Run) -> list[str]:
    return [study.label(run) if a.path == OBJECTIVE else _text(run.value(a.path))
            for a in study.axes]


def report_table(study: Study, summaries: list[RunSummary], with_eval: bool) -> str:
    """The markdown table: one row per cell (a value of every axis), over seeds."""
    header = [a.title for a in study.axes] + [
        "seeds", "final reward", "best reward", "collapse step", "dip step",
        "clip_frac", "ratio_dev", "ppo_kl", "entropy", "grad_norm", "response len"]
    if with_eval:
        header.insert(len(study.axes) + 3, "held-out")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    key = _row_key(study)
    for cell in sorted({s.run.cell for s in summaries},
                       key=lambda c: key(next(s.run for s in summaries if s.run.cell == c))):
        group = sorted((s for s in summaries if s.run.cell == cell), key=lambda s: s.run.seed)
        row = _axis_cells(study, group[0].run) + [
            str(len(group)), _mean_std([s.final for s in group]), _mean_std([s.best for s in group])]
        if with_eval:
            row.append(_mean_std([s.eval for s in group]))
        row.append(_events_cell([[s.collapse] if s.collapse else [] for s in group]))
        row.append(_events_cell([list(s.dips) for s in group]))
        row += [_mean_std([s.late[k] for s in group]) for k in LATE_METRICS]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def runs_table(study: Study, summaries: list[RunSummary]) -> str:
    titles = [a.title for a in study.axes]
    rows = ["| run | " + " | ".join(titles) + " | seed | steps | final | best | collapse | dips "
            "| wall time |", "|" + "---|" * (len(titles) + 8)]
    key = _row_key(study)
    for s in sorted(summaries, key=lambda s: (key(s.run), s.run.seed)):
        event = "none" if s.collapse is None else f"{s.collapse[0]} ({s.collapse[1]})"
        dips = ", ".join(f"{step} ({reason})" for step, reason in s.dips) or "none"
        wall = "—" if s.wall_s is None else f"{s.wall_s:.0f} s"
        rows.append(f"| {s.run.name} | " + " | ".join(_axis_cells(study, s.run))
                    + f" | {s.run.seed} | {s.steps} | {s.final:.3f} | {s.best:.3f} | {event} "
                    f"| {dips} | {wall} |")
    return "\n".join(rows)


def _map_axes(study: Study):
    """The map's (x axis, y axis, objective axis, the other axes), or None without `spec.map`."""
    spec = study.spec
    if "map" not in spec:
        return None
    x, y, objective = study.axis(spec.map.x), study.axis(spec.map.y), study.axis(OBJECTIVE)
    for name, axis, path in (("x", x, spec.map.x), ("y", y, spec.map.y)):
        if axis is None or axis.path == OBJECTIVE:
            raise ValueError(f"study map.{name}={path!r} is not an axis other than {OBJECTIVE}; "
                             f"axes: {[a.path for a in study.axes]}")
    if objective is None:
        raise ValueError(f"study map: the map compares objectives; add the axis {OBJECTIVE}")
    others = [a for a in study.axes if a.path not in (x.path, y.path, OBJECTIVE)]
    return x, y, objective, others


def _frontier_text(cells, objective, x: Axis, y_value, edge) -> str:
    """`μ 8`; `μ ≥ 8 (μ > 8 not measured)` when no larger x has a finished run yet; `none` when the
    smallest measured x collapsed; `not measured` when the row has no finished run."""
    measured = [v for v in x.values if cells[objective, v, y_value].n]
    if not measured:
        return "not measured"
    if edge is None:
        return "none"
    if edge == measured[-1] and edge != x.values[-1]:
        return f"{x.title} ≥ {_text(edge)} ({x.title} > {_text(edge)} not measured)"
    return f"{x.title} {_text(edge)}"


def map_section(study: Study, finished: list[RunSummary], planned: int, plot: bool) -> list[str]:
    """The report's map: per combination of the other axes, the heatmaps (if `plot`), the
    frontier per objective and the table with Fisher's test."""
    x, y, objective, others = _map_axes(study)
    objectives = list(objective.values)
    labels = {o: _objective_label(o, study.base.rl.estimator) for o in objectives}
    lines = ["## Stability map", "",
             f"Per cell ({x.title} × {y.title}) and objective: finished seeds, seeds that collapsed "
             "(did not recover: the windowed reward fell more than δ below its best and never came "
             "back within δ/2, or the windowed entropy fell under the floor for good, or an update "
             "was non-finite) and seeds with a transient dip (the same fall, then back) — "
             "`cfpo_jax.stability`. *p*: two-sided Fisher exact test of equal collapse counts "
             f"between the objectives. *Frontier*: at each {y.title}, the largest {x.title} with "
             f"no collapsed seed there or at any smaller {x.title}. The last columns are late-run "
             f"means (last {study.spec.late_fraction:.0%} of steps) of where the objectives differ "
             "even without a collapse.", ""]
    # One map per combination of the other axes that the study runs: linked axes in step.
    groups = [g for g in ([a for a in group if a in others] for group in study._groups()) if g]
    for combo in itertools.product(*(range(len(g[0].values)) for g in groups)):
        fixed = {a.path: a.values[i] for g, i in zip(groups, combo) for a in g}
        runs = [stability.MapRun(
            x=s.run.value(x.path), y=s.run.value(y.path), objective=s.run.value(OBJECTIVE),
            collapsed=s.collapse is not None, dipped=bool(s.dips), final=s.final,
            late={k: s.late[k] for k in stability.MAP_METRICS})
            for s in finished if all(s.run.value(p) == v for p, v in fixed.items())]
        cells = stability.map_cells(runs, x.values, y.values, objectives)
        suffix = "_".join(a.name(fixed[a.path]) for a in others)
        if fixed:
            lines += ["### " + ", ".join(f"{a.title} = {_text(fixed[a.path])}" for a in others), ""]
        for o in objectives:
            edge = stability.frontier(cells, o, x.values, y.values)
            lines.append(f"- frontier of {labels[o]}: " + "; ".join(
                f"{y.title} {_text(v)} → " + _frontier_text(cells, o, x, v, e)
                for v, e in edge.items()))
        lines.append("")
        if plot:
            name = "map" + (f"_{suffix}" if suffix else "")
            stability.plot_map(os.path.join(study.output_dir, f"{name}.png"), cells,
                               list(x.values), list(y.values), objectives, labels, x.title,
                               y.title, title=f"{study.spec.name}: {len(runs)} finished runs "
                               f"of {planned} planned"
                               + (f", {suffix}" if suffix else ""))
            lines += [f"![{name}]({name}.png)", ""]
        lines += [stability.map_table(cells, list(x.values), list(y.values), objectives, labels,
                                      x.title, y.title), ""]
    return lines


def write_report(study: Study, plot: bool = True) -> str:
    """Reads every run of the study on disk, writes report.md (and the plots); returns its text."""
    spec, c = study.spec, study.spec.collapse
    summaries, curves = [], {}
    planned = study.runs()
    for run in planned:
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
    axes_text = ", ".join(f"`{a.path}` ∈ {{{', '.join(_text(v) for v in a.values)}}}"
                          for a in study.axes)
    lines = [
        f"# Stability study: {spec.name}",
        "",
        f"Base config `{study.base_file}`; axes {axes_text}; seeds "
        f"{{{', '.join(str(s) for s in spec.seeds)}}}: {len(planned)} runs, {len(finished)} finished"
        + (f", {len(summaries) - len(finished)} unfinished (in the runs list only)"
           if len(summaries) > len(finished) else "") + ". Command:",
        "",
        "```",
        f"python -m cfpo_jax.study --config={study.base_file} --study={study.study_file}"
        + "".join(f" --config.{k}={_flag_value(v)}" for k, v in study.cli_overrides.items()),
        "```",
        "",
    ]
    if len(finished) < len(planned):
        lines += [f"**Partial**: {len(finished)} of the {len(planned)} planned runs have finished; "
                  "every number below is over those only. The same command resumes the study.", ""]
    lines += [
        "One row per cell (a value of each axis), mean ± sample std over seeds. *final* / *best "
        f"reward*: the mean reward of the last {c.window} steps / of the best {c.window}-step "
        "window. *collapse step*: seeds that collapsed without recovering and the step of each; "
        "*dip step*: seeds with a transient dip that recovered, and the step of each one's first "
        f"(`cfpo_jax.stability.outcome`: the {c.window}-step mean reward — over all steps so far "
        f"before step {c.window} — more than δ = {c.delta} below its best so far, or the "
        f"{c.window}-step mean entropy below {c.entropy_floor}; a dip comes back (reward within "
        "δ/2 of its best, entropy over the floor), a collapse does not; a non-finite update is a "
        "collapse)."
        + (f" *held-out*: `{spec.eval_metric}` at the end of training." if spec.eval_metric else "")
        + f" The last six columns are means over the last {spec.late_fraction:.0%} of steps; for "
        "CFPO, clip_frac is the fraction PPO *would* clip.",
        "",
        report_table(study, finished, with_eval=bool(spec.eval_metric)),
        "",
    ]
    if _map_axes(study) is not None:
        lines += map_section(study, finished, len(planned), plot)
    if plot and finished:
        names = plot_curves(study, curves)
        lines += ["## Curves", "",
                  f"Mean over seeds with a band from the lowest to the highest seed, each seed "
                  f"smoothed over {c.window} steps.", ""]
        lines += [f"![{n}]({n}.png)" for n in names] + [""]
    lines += ["## Runs", "", "Wall time: of the study invocation that finished the run (— : "
              "unfinished).", "",
              runs_table(study, summaries), ""]
    text = "\n".join(lines)
    os.makedirs(study.output_dir, exist_ok=True)
    with open(os.path.join(study.output_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def plot_curves(study: Study, curves: dict) -> list[str]:
    """One PNG per metric in PLOTTED: a line per objective (mean over seeds, band min–max); a
    panel column per value of the first axis other than the objective (the map's x when there is
    a map), a panel row per combination of the remaining axes. Returns the file names without
    extension."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the study's plots need matplotlib: pip install 'cfpo_jax[study]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = study.spec
    others = [a for a in study.axes if a.path != OBJECTIVE]
    if "map" in spec:
        others.sort(key=lambda a: a.path != spec.map.x)
    column_axis, row_axes = (others[0], others[1:]) if others else (None, [])
    columns = list(column_axis.values) if column_axis else [None]
    rows = list(itertools.product(*(a.values for a in row_axes)))
    objective = study.axis(OBJECTIVE)
    lines_of = list(objective.values) if objective else [None]
    colors = {"cfpo": "tab:blue", "ppo": "tab:red"}
    names = []
    for metric in PLOTTED:
        fig, axes = plt.subplots(len(rows), len(columns), squeeze=False, sharey=True,
                                 figsize=(3.6 * len(columns), 2.8 * len(rows)))
        for i, row in enumerate(rows):
            fixed = dict(zip((a.path for a in row_axes), row))
            for j, column in enumerate(columns):
                ax = axes[i][j]
                if column_axis:
                    fixed[column_axis.path] = column
                for line in lines_of:
                    seeds = [(run, records) for run, records in curves.items()
                             if all(run.value(p) == v for p, v in fixed.items())
                             and (line is None or run.value(OBJECTIVE) == line)]
                    smoothed = []
                    for _, records in seeds:
                        steps = sorted(s for s, r in records.items() if metric in r)
                        values = np.array([_number(records[s][metric]) for s in steps])
                        w = min(spec.collapse.window, len(values))
                        if w:
                            smoothed.append((np.array(steps[w - 1:]),
                                             stability.window_means(values, w)))
                    if not smoothed:
                        continue
                    n = min(len(v) for _, v in smoothed)
                    x = smoothed[0][0][:n]
                    y = np.stack([v[:n] for _, v in smoothed])
                    label = study.label(seeds[0][0])
                    color = colors.get(line)
                    ax.plot(x, y.mean(0), color=color,
                            label=f"{label} ({len(smoothed)} seed{'s' * (len(smoothed) > 1)})")
                    ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.2, linewidth=0)
                shown = {p: v for p, v in fixed.items() if len(study.axis(p).values) > 1} or fixed
                ax.set_title(", ".join(f"{study.axis(p).title} = {_text(v)}"
                                       for p, v in shown.items()), fontsize=9)
                ax.set_xlabel("RL step")
                if j == 0:
                    ax.set_ylabel(metric)
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize="x-small")
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
        _map_axes(study)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not args["plot-only"].value:
        started = time.time()
        run_all(study, parallel, log=lambda m: print(m, flush=True))
        print(f"study: every run finished ({time.time() - started:.0f} s in this invocation)",
              flush=True)
    write_report(study)
    print(f"report: {os.path.join(study.output_dir, 'report.md')}", flush=True)


def _parse_flags(argv):
    """absl flag parsing with the base config and the study file found by name (`config.find`)."""
    return flags.FLAGS(config_lib.resolve_flag(config_lib.resolve_flag(argv, "config"), "study"))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
