"""cfpo_jax.sandbox and the `code` reward: what a confined run and a verdict cost, against a
bare interpreter and against another checkout's sandbox (the baseline), measured back to back.

    python benchmarks/sandbox.py                                   # this checkout only
    git archive b4e5a95 cfpo_jax | tar -x -C /tmp/base            # e.g. main before issue 31
    python benchmarks/sandbox.py --baseline /tmp/base --rounds 3   # ~3 min on 2 loaded cores

Each round measures, in a fresh interpreter per checkout (baseline first, then this one), with
the checkout's cfpo_jax first on sys.path:

* bare interpreter: `subprocess.run([python, "-I", "-S", "-c", "pass"])`, median of `--calls`;
* run_python('pass'): one whole sandboxed call, median of `--calls` sequential calls;
* code reward, one row: `rewards.get("code")` on one correct HumanEval-style row (the per-call
  overhead of a verdict), median of `--calls`;
* code reward, 164 HumanEval canonical solutions in one batch (rows in parallel, as in
  training): total seconds and rows per second; every row must score 1.

The table gives the median over rounds of each and this checkout's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ADD = {"test": ["def check(candidate):\n    assert candidate(2, 3) == 5\n"],
       "entry_point": ["add"]}


def _median_s(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(calls: int) -> dict:
    """One checkout's numbers (run in a child with that checkout first on sys.path)."""
    from cfpo_jax import data, rewards, sandbox
    python = os.path.realpath(sys.executable)
    code = rewards.get("code")
    isolation = str(sandbox.isolation())
    assert sandbox.run_python("pass").ok
    bare = _median_s(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True),
                     calls)
    confined = _median_s(lambda: sandbox.run_python("pass"), calls)
    one_row = _median_s(lambda: code(["def add(a, b):\n    return a + b\n"], [""], **ADD), calls)
    humaneval = data.load("humaneval:test", preset="humaneval")
    rows = [humaneval[i] for i in range(len(humaneval))]
    started = time.perf_counter()
    scores = code([r["prompt"] + r["canonical_solution"] for r in rows], [""] * len(rows),
                  test=[r["test"] for r in rows], entry_point=[r["entry_point"] for r in rows],
                  prompt=[r["prompt"] for r in rows])
    total = time.perf_counter() - started
    assert scores.sum() == len(rows), scores
    return {"isolation": isolation, "bare": bare, "run_python": confined, "one_row": one_row,
            "humaneval_total": total, "rows_per_s": len(rows) / total}


def _child(checkout: str, calls: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [checkout] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    done = subprocess.run([sys.executable, __file__, "--measure", "--calls", str(calls)],
                          env=env, cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", default="", help="a directory holding another cfpo_jax")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.calls)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkouts = ([("baseline", os.path.abspath(args.baseline))] if args.baseline else []) + \
        [("this", here)]
    runs = {name: [] for name, _ in checkouts}
    for round_ in range(args.rounds):
        for name, path in checkouts:
            runs[name].append(_child(path, args.calls))
            print(f"round {round_ + 1} {name}: {runs[name][-1]}  (load average "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "isolation"}
           for name, rs in runs.items()}
    print(f"\n{os.cpu_count()} CPUs; this checkout: {runs['this'][0]['isolation']}")
    if args.baseline:
        print(f"baseline: {runs['baseline'][0]['isolation']}")
    names = [name for name, _ in checkouts]
    print("| what | " + " | ".join(names) + (" | this / baseline |" if args.baseline else " |"))
    print("|---|" + "---|" * (len(names) + bool(args.baseline)))
    for key, what in (("bare", "bare interpreter, s per call"),
                      ("run_python", "run_python('pass'), s per call"),
                      ("one_row", "code reward, one row, s per call"),
                      ("humaneval_total", "code reward, 164 HumanEval gold, s per batch"),
                      ("rows_per_s", "... rows per second")):
        cells = [f"{med[name][key]:.3f}" for name in names]
        ratio = f" | {med['this'][key] / med['baseline'][key]:.2f}×" if args.baseline else ""
        print(f"| {what} | " + " | ".join(cells) + ratio + " |")


if __name__ == "__main__":
    main()
