"""Multi-process runs through jax.distributed on localhost (127.0.0.1 only): 2 CPU processes × 4
devices each, compared with 1 process × 8 devices."""

import json
import os
import socket
import subprocess
import sys

from _shared_data import shared_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1")
    return env


_SCORE = """
import json, sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from cfpo_jax import rewards
rows = [json.loads(line) for line in open({data!r})][:12]
completions = [r["solution"] if i % 2 else r"\\\\boxed{{-31415}}" for i, r in enumerate(rows)]
with rewards.Scorer(["math", "_rewards:scoring_process"], num_workers=1) as scorer:
    scores = scorer(completions, [r["answer"] for r in rows])
print(json.dumps({{name: values.tolist() for name, values in scores.per_fn.items()}}))
"""


def test_rewards_are_scored_once_across_processes_and_shared():
    script = _SCORE.format(port=free_port(), data=str(shared_file("math500_test.jsonl")))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=process_env(4),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1]  # every process trains on the same rewards
    assert results[0]["math"] == [0.0, 1.0] * 6
    # Item t was scored by process t mod 2 (a worker's parent), each item once.
    pids = results[0]["_rewards:scoring_process"]
    assert pids == [float(procs[0].pid), float(procs[1].pid)] * 6

