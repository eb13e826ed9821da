"""cfpo_jax.sandbox and the `code` reward: what a confined run costs against a bare interpreter.

    python benchmarks/sandbox.py                  # ~1 min on 2 cores
    python benchmarks/sandbox.py --calls 50

Rows (wall seconds, median of `--calls` sequential calls, or one batch):

* bare interpreter: `subprocess.run([python, "-I", "-S", "-c", "pass"])` — the floor for any
  design that starts a fresh interpreter per call;
* run_python("pass"): the whole sandboxed call (temp dir, uid lease, the launcher interpreter,
  namespaces and mounts, the user's interpreter, cleanup);
* parallel: `--calls` run_python calls from os.cpu_count() threads, per call;
* HumanEval: the `code` reward on all 164 canonical solutions, one batch (rows in parallel),
  total and per problem.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import time

from cfpo_jax import data, rewards, sandbox


def _median_s(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    python = os.path.realpath(sys.executable)
    print(f"isolation: {sandbox.isolation()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    bare = _median_s(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True),
                     args.calls)
    confined = _median_s(lambda: sandbox.run_python("pass"), args.calls)
    threads = os.cpu_count() or 1
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda _: sandbox.run_python("pass"), range(args.calls)))
    parallel = (time.perf_counter() - started) / args.calls
    assert all(r.ok for r in results)
    humaneval = data.load("humaneval:test", preset="humaneval")
    rows = [humaneval[i] for i in range(len(humaneval))]
    started = time.perf_counter()
    scores = rewards.get("code")([r["prompt"] + r["canonical_solution"] for r in rows],
                                 [""] * len(rows), test=[r["test"] for r in rows],
                                 entry_point=[r["entry_point"] for r in rows])
    total = time.perf_counter() - started
    assert scores.sum() == len(rows), scores
    print("| what | seconds | vs bare interpreter |")
    print("|---|---|---|")
    print(f"| bare interpreter (`python -I -S -c pass`), per call | {bare:.3f} | 1.0× |")
    print(f"| run_python('pass'), per call | {confined:.3f} | {confined / bare:.1f}× |")
    print(f"| run_python('pass'), {threads} threads, per call | {parallel:.3f} | "
          f"{parallel / bare:.1f}× |")
    print(f"| code reward, 164 HumanEval canonical solutions, total | {total:.1f} | |")
    print(f"| ... per problem | {total / len(rows):.3f} | {total / len(rows) / bare:.1f}× |")


if __name__ == "__main__":
    main()
