"""Every timing the scale issues (4, 10, 11, 15) still owe a GPU or TPU, in one call of under 8
minutes on one accelerator host, written to one results file.

    bash benchmarks/accelerator.sh --commit <hash>        # the device machine: $OUT/accelerator.jsonl
    python benchmarks/accelerator.py --out results.jsonl  # any GPU/TPU host with the packages installed
    python benchmarks/accelerator.py --dry-run --out /tmp/dry.jsonl   # the same steps, tiny shapes, CPU

Steps, in this order (each the existing benchmark script or test, in its own process):

| step | figure | issue | real run |
|---|---|---|---|
| env | device kind and count, versions; imports every module the steps need | — | probe |
| attention | fused attention against the reference (GPU: cuDNN; TPU: splash) | 10 | tests/test_attention.py |
| sampler | tokens/s and % of the decode roofline, 0.5B and 1.5B, batch 256, 256 + 512 tokens | 4, 11 | sampling.py |
| train_step | the update's tokens/s and MFU at 1.5B, remat full, 8 × (1,024 + 1,024) | 10 | train_step.py |
| long_tail | continuous batching against static batches, 0.5B, 1,024 rows, K = 256 | 11 | sampling.py --long-tail |
| lora_sampling | LoRA rank 64 on the fly against merged per call, 0.5B, batch 256 | 15 | sampling.py --lora-rank |
| rl_step | one RL step split into sample / score / learn, 0.5B, 32 prompts × 8, 512 + 1,024 | 10 | rl_step.py |

The exact command of each is in its record. Shapes and repeats are chosen to fit the 8 minutes:
the long tail runs issue 11's distribution at half its lengths (log-normal median 200, capped at
2,048, instead of 400 and 4,096: the same shape of distribution, so the same ratio of useful work,
at half the static baseline's cost), the RL step half math_qwen's per-GPU prompts. Each step has
its own time limit and the whole run a budget (`--budget-s`, 470 s): a step that runs over is
killed with its whole process group and recorded as "timed out", and the next one starts; a step
that the spent budget leaves no time is recorded as "skipped". Steps run in the order of the
table, so the figures the issues' goals name come first.

Results: JSON lines, appended as each step ends (a run cut short keeps what it finished). Line 1
describes the run: date, commit, host, device kind and count, package versions and the chip's
published figures (benchmarks/chips.py; null for a chip not in that table). Then one line per
step: name, issue, command, status (ok, failed, timed out, skipped), seconds, the figures the
script wrote with `--json` (for the test step: pytest's counts), and the last lines of its output.
Where the chip is not in benchmarks/chips.py, the figures against published peaks
(`roofline_fraction_spec`, `mfu_spec`) are null: the run reports them missing, it does not guess.
A markdown summary is printed at the end; `--summary RESULTS` prints it again from a results file.

`--dry-run` runs the same steps with the same scripts at tiny shapes on CPU (tests/test_benchmarks.py
runs it, so the sequence cannot rot); its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chips  # noqa: E402

BUDGET_S = 470  # 8 minutes less the start of the interpreters and the wheel install
TAIL_LINES = 40
DRY_RUN_LIMIT_S = 300  # per step
# XLA:CPU without LLVM's costly optimisations: halves the dry run's CPU time (measured: the LoRA step
# 54 -> 30 CPU s); the dry run checks that the steps run, it times nothing.
DRY_RUN_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Imports every module the steps import, so that a package missing from the host's image fails
# once, here, with its name (benchmarks/README.md says how to carry it), not in every step.
PROBE = """
import json, os, platform
import jax, jaxlib, flax, optax, numpy, ml_collections
import cfpo_jax.learner, cfpo_jax.rollout, cfpo_jax.lora
device = jax.devices()[0]
print("PROBE " + json.dumps(dict(
    platform=device.platform, device_kind=device.device_kind, device_count=jax.device_count(),
    memory_bytes=(device.memory_stats() or {}).get("bytes_limit"), python=platform.python_version(),
    versions={m.__name__: getattr(m, "__version__", "?") for m in (jax, jaxlib, flax, optax, numpy)})))
"""

# The fused-attention tests of each platform, run with that platform as jax's default backend
# (tests/conftest.py defaults it to cpu). On CPU the cuDNN test skips, saying why.
KERNEL_TESTS = {
    "gpu": ("cuda,cpu", ["tests/test_attention.py", "-k", "cudnn"]),
    "tpu": ("tpu,cpu", ["tests/test_attention.py", "-k", "splash"]),
    "cpu": ("cpu", ["tests/test_attention.py", "-k", "cudnn"]),
}


@dataclasses.dataclass
class Step:
    name: str
    issue: str
    figure: str
    argv: list  # after the interpreter
    limit_s: float
    collect: str = "json"  # "json": the script's --json file; "junit": pytest's report; "probe": PROBE's line
    env: dict = dataclasses.field(default_factory=dict)


def plan(device_platform: str, dry_run: bool) -> list[Step]:
    """The steps after the probe, with their commands: the real shapes, or tiny ones on CPU."""
    platforms, tests = KERNEL_TESTS.get(device_platform, KERNEL_TESTS["cpu"])
    pytest = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    sampling, train_step, rl_step = (f"benchmarks/{name}.py" for name in ("sampling", "train_step", "rl_step"))
    if dry_run:
        sampler = [sampling, "--small", "--no-hf", "--batches", "4", "--new-tokens", "16", "--repeats", "1"]
        train = [train_step, "--shapes", "tiny", "--remat", "full", "--lora-rank", "0", "--batch", "2",
                 "--prompt-len", "16", "--new-tokens", "16", "--steps", "2", "--peak-size", "256"]
        tail = [sampling, "--small", "--long-tail", "--rows", "16", "--median-len", "8", "--new-tokens", "16",
                "--max-concurrent", "8", "--repeats", "1"]
        lora = [sampling, "--small", "--lora-rank", "8", "--batches", "4", "--new-tokens", "8", "--repeats", "1"]
        rl = [rl_step, "--small", "--prompts", "4", "--samples", "2", "--new-tokens", "16", "--steps", "2"]
    else:
        sampler = [sampling, "--shapes", "0.5b,1.5b", "--batches", "256", "--no-hf", "--repeats", "2"]
        train = [train_step, "--shapes", "1.5b", "--remat", "full", "--lora-rank", "0", "--batch", "8",
                 "--prompt-len", "1024", "--new-tokens", "1024", "--steps", "3"]
        tail = [sampling, "--shapes", "0.5b", "--long-tail", "--rows", "1024", "--median-len", "200",
                "--new-tokens", "2048", "--max-concurrent", "256", "--repeats", "1"]
        lora = [sampling, "--shapes", "0.5b", "--lora-rank", "64", "--batches", "256", "--repeats", "1"]
        rl = [rl_step, "--shape", "0.5b", "--prompts", "32", "--samples", "8", "--prompt-len", "512",
              "--new-tokens", "1024", "--micro-batch", "64", "--steps", "3"]
    def limit(seconds):  # the real run's; a dry run on a shared 2-core box gets more (it is not timed)
        return DRY_RUN_LIMIT_S if dry_run else seconds

    return [
        Step("attention", "10", "fused attention against the reference", pytest, limit(90), "junit",
             dict(JAX_PLATFORMS=platforms)),
        Step("sampler", "4, 11", "sampler tokens/s and % of the decode roofline", sampler, limit(130)),
        Step("train_step", "10", "update tokens/s and MFU", train, limit(110)),
        Step("long_tail", "11", "continuous batching against static batches", tail, limit(120)),
        Step("lora_sampling", "15", "LoRA on the fly against merged per call", lora, limit(110)),
        Step("rl_step", "10", "RL step split: sample / score / learn", rl, limit(120)),
    ]


def run_step(step: Step, limit_s: float, workdir: str, base_env: dict) -> dict:
    """Runs one step in its own process group, killed whole after `limit_s`; returns its record."""
    report = os.path.join(workdir, f"{step.name}.{'xml' if step.collect == 'junit' else 'json'}")
    argv = [sys.executable, *step.argv]
    if step.collect == "json":
        argv += ["--json", report]
    elif step.collect == "junit":
        argv += [f"--junitxml={report}"]
    log_path = os.path.join(workdir, f"{step.name}.log")
    start, cpu_start = time.monotonic(), _children_cpu_s()
    with open(log_path, "w") as log:
        child = subprocess.Popen(argv, cwd=ROOT, env={**base_env, **step.env}, stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            returncode = child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # a timeout, or the driver itself interrupted: nothing of the step outlives it
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
    seconds, cpu_s = time.monotonic() - start, _children_cpu_s() - cpu_start
    with open(log_path, errors="replace") as log:
        output = log.read()
    record = dict(record="step", name=step.name, issue=step.issue, figure=step.figure,
                  command=shlex.join(["python", *argv[1:]]), env=step.env, limit_s=round(limit_s),
                  seconds=round(seconds, 1), cpu_s=round(cpu_s, 1), figures=None,
                  output_tail="\n".join(output.splitlines()[-TAIL_LINES:]))
    if returncode is None:
        record["status"] = f"timed out after {limit_s:.0f} s"
    elif step.collect == "junit" and os.path.exists(report):
        record["figures"] = junit_counts(report)
        record["status"] = "ok" if returncode == 0 else f"failed (exit {returncode})"
    elif returncode:
        record["status"] = f"failed (exit {returncode})"
    elif step.collect == "probe":
        lines = [line for line in output.splitlines() if line.startswith("PROBE ")]
        record["figures"] = json.loads(lines[-1][len("PROBE "):]) if lines else None
        record["status"] = "ok" if lines else "failed (no PROBE line)"
    elif not os.path.exists(report):
        record["status"] = f"failed (exit 0 but no {os.path.basename(report)})"
    else:
        with open(report) as f:
            record["figures"] = json.load(f)
        record["status"] = "ok"
    return record


def _children_cpu_s() -> float:
    """User + system CPU seconds of the driver's finished child processes (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def junit_counts(path: str) -> dict:
    """pytest's counts from its JUnit XML report, with each skipped or failed test's message."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    notes = {}
    for case in suite.iter("testcase"):
        for outcome in ("skipped", "failure", "error"):
            element = case.find(outcome)
            if element is not None:
                notes[case.get("name")] = f"{outcome}: {(element.get('message') or '')[:300]}"
    return dict(passed=tests - failed - skipped, failed=failed, skipped=skipped, notes=notes)


def _percent(fraction: float | None) -> str:
    return "missing" if fraction is None else f"{fraction:.0%}"


def headline(record: dict) -> str:
    """One line of the step's figures for the summary table."""
    f, percent = record["figures"], _percent
    if not f:
        return ""
    name = record["name"]
    if name == "env":
        return f"{f['device_count']} × {f['device_kind']}, jax {f['versions']['jax']}"
    if name == "attention":
        return f"{f['passed']} passed, {f['failed']} failed, {f['skipped']} skipped"
    if name == "sampler":
        return "; ".join(f"{r['shape']} b{r['batch']}: {r['tokens_per_s']:,.0f} tok/s, "
                         f"roof {percent(r['roofline_fraction'])} (spec {percent(r['roofline_fraction_spec'])})"
                         for r in f["rows"])
    if name == "train_step":
        rows = []
        for r in f["rows"]:
            timed = "step_s" in r  # else not run (over the device memory) or failed
            rows.append(f"{r['shape']} remat {r['remat']}: " + (
                f"{r['tokens_per_s']:,.0f} tok/s, MFU {percent(r['mfu'])} (spec {percent(r['mfu_spec'])})" if timed
                else r.get("skipped") or r.get("failed")))
        return "; ".join(rows)
    if name == "long_tail":
        return (f"{f['speedup']:.2f}× ({f['engine_tokens_per_s']:,.0f} against {f['static_tokens_per_s']:,.0f} "
                "useful tok/s)")
    if name == "lora_sampling":
        return "; ".join(f"b{r['batch']}: merged/on-the-fly {r['merged_over_on_the_fly']:.2f}×" for r in f["rows"])
    if name == "rl_step":
        return (f"step {f['step_s']:.2f} s: sample {f['sample_s'] / f['step_s']:.0%}, "
                f"score {f['score_s'] / f['step_s']:.0%}, learn {f['learn_s'] / f['step_s']:.0%}")
    return ""


def commit_of(checkout: str, given: str | None) -> str:
    if given:
        return given

    def git(*args):
        return subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here: pass --commit)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="accelerator.jsonl", help="the results file (JSON lines)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps at tiny shapes on CPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"time for all steps (default {BUDGET_S} s; dry run: none)")
    parser.add_argument("--only", default=None, help="comma list of steps to run (after env): e.g. a rerun")
    parser.add_argument("--commit", default=None, help="the checkout's commit, where it has no .git")
    parser.add_argument("--summary", metavar="RESULTS", help="print the summary table of a results file; run nothing")
    args = parser.parse_args(argv)
    if args.summary:
        with open(args.summary) as f:
            run, *records = [json.loads(line) for line in f]
        print_summary(run, records)
        return 0
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0 seconds; got {args.budget_s}")
    valid = [step.name for step in plan("cpu", dry_run=True)]
    if args.only and set(args.only.split(",")) - set(valid):
        parser.error(f"unknown steps in --only {args.only!r}; valid: {', '.join(valid)}")
    start = time.monotonic()
    budget = args.budget_s if args.budget_s is not None else None if args.dry_run else BUDGET_S

    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if args.dry_run:  # CPU; and compiling tiny programs is most of the dry run's time: compile them fast
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), DRY_RUN_XLA_FLAGS]))
    else:  # a second call on a still-warm machine compiles nothing again
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cfpo-jax-compile-cache"))
    # The driver imports no jax: each step's process has the whole accelerator to itself.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"{os.path.basename(__file__)}: terminated"))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="accelerator-") as workdir, open(args.out, "w") as out:
        def write(record):
            out.write(json.dumps(record) + "\n")
            out.flush()

        probe = run_step(Step("env", "", "device and packages", ["-c", PROBE], 120, "probe"), 120, workdir, env)
        device = probe["figures"] or {}
        chip = chips.lookup(device.get("device_kind", ""))
        run = dict(record="run", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   commit=commit_of(ROOT, args.commit), dry_run=args.dry_run, budget_s=budget,
                   host=platform.node(), cpus=os.cpu_count(), command=shlex.join(["python", *sys.argv]),
                   chip=dataclasses.asdict(chip) if chip else None, **device)
        write(run)
        write(probe)
        records = [probe]
        print(f"env: {probe['status']} ({probe['seconds']} s) {headline(probe)}", flush=True)
        if probe["status"] != "ok":
            print(probe["output_tail"] + "\nthe probe failed: a package the steps import may be missing from "
                  "this host; benchmarks/README.md says how to carry wheels", flush=True)
        steps = plan(device.get("platform", "cpu"), args.dry_run) if probe["status"] == "ok" else []
        if args.only:
            steps = [step for step in steps if step.name in args.only.split(",")]
        for step in steps:
            left = None if budget is None else budget - (time.monotonic() - start)
            if left is not None and left < min(30, step.limit_s):
                record = dict(record="step", name=step.name, issue=step.issue, figure=step.figure,
                              command=shlex.join(["python", *step.argv]), status="skipped: budget spent",
                              seconds=0, figures=None)
            else:
                record = run_step(step, step.limit_s if left is None else min(step.limit_s, left), workdir, env)
            write(record)
            records.append(record)
            print(f"{step.name}: {record['status']} ({record['seconds']} s, {record.get('cpu_s', 0)} s CPU) "
                  f"{headline(record)}", flush=True)
            if record["status"] != "ok" and record.get("output_tail"):
                print("  " + record["output_tail"][-2000:].replace("\n", "\n  "), flush=True)

    print(f"\n{time.monotonic() - start:.0f} s in all; results: {args.out}")
    print_summary(run, records)
    return 0 if all(r["status"] == "ok" for r in records) else 1


def print_summary(run: dict, records: list[dict]):
    """The run and one row per step, as markdown (for benchmarks/README.md)."""
    print(f"\n{run['date']}, commit {run['commit']}, {run.get('device_count', '?')} × {run.get('device_kind', '?')}"
          f"{' (dry run)' if run['dry_run'] else ''}, jax {run.get('versions', {}).get('jax', '?')}, "
          f"host {run['host']}\n")
    print("| step | issue | status | s | CPU s | figures |\n|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['name']} | {r['issue']} | {r['status']} | {r['seconds']} | {r.get('cpu_s', 0)} | {headline(r)} |")


if __name__ == "__main__":
    sys.exit(main())
