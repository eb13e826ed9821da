"""Multi-process runs through jax.distributed on localhost (127.0.0.1 only): 2 CPU processes × 4
devices each, compared with 1 process × 8 devices."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.fixtures.paths import ROOT
from tests.fixtures.processes import free_port, process_env
from tests.fixtures.shared_data import shared_file


_SCORE = """
import json, sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from cfpo_jax import rewards
rows = [json.loads(line) for line in open({data!r})][:12]
completions = [r["solution"] if i % 2 else r"\\\\boxed{{-31415}}" for i, r in enumerate(rows)]
with rewards.Scorer(["math", "tests.fixtures.rewards:scoring_process"], num_workers=1) as scorer:
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
    pids = results[0]["tests.fixtures.rewards:scoring_process"]
    assert pids == [float(procs[0].pid), float(procs[1].pid)] * 6


# ---------------------------------------------------------------- the trainer

# The trainer tests' tiny run (tests/fixtures/runs.py), with a dense reward and no evaluation.
TRAIN_ARGS = ["--config.data.batch_size=4", "--config.rl.group_size=4",
              "--config.sampling.max_new_tokens=3", "--config.warmstart.steps=0",
              "--config.train.tensorboard=False", "--config.rewards.fns=('tests.fixtures.rewards:digit_fraction',)",
              "--config.optim.schedule=constant", "--config.eval.sources=()",
              "--config.train.checkpoint_every=100"]


def launch_trainer(workdir, *overrides, processes=2):
    """`python -m cfpo_jax.train` as `processes` jax.distributed processes (4 devices each) or,
    with processes=1, one process with 8 devices; each one's output goes to <workdir>.<i>.log."""
    base = [sys.executable, "-m", "cfpo_jax.train", "--config=configs/quickstart.py",
            f"--workdir={workdir}", *TRAIN_ARGS, *overrides]
    port = free_port()
    procs = []
    for i in range(processes):
        args = base if processes == 1 else base + [
            "--config.mesh.distributed=True", f"--config.mesh.coordinator_address=127.0.0.1:{port}",
            f"--config.mesh.num_processes={processes}", f"--config.mesh.process_id={i}"]
        log = open(f"{workdir}.{i}.log", "a")
        procs.append(subprocess.Popen(args, env=process_env(8 if processes == 1 else 4), cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
        procs[-1].log_path = log.name
    return procs


def finish(procs, timeout=900):
    """Each process's output, once all have exited 0."""
    outputs = []
    for proc in procs:
        proc.wait(timeout=timeout)
        with open(proc.log_path) as f:
            out = f.read()
        assert proc.returncode == 0, out[-4000:]
        outputs.append(out)
    return outputs


def read_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


KEYS = ("loss", "grad_norm", "reward_mean", "clip_frac", "response_len_mean")


def test_two_processes_train_like_one_process(tmp_path):
    """2 processes × 4 devices and 1 process × 8 devices: the same first steps (losses, gradient
    norms, rewards); one metrics file, written once per step."""
    two = launch_trainer(tmp_path / "two", "--config.train.num_steps=2")
    one = launch_trainer(tmp_path / "one", "--config.train.num_steps=2", processes=1)
    finish(two + one)
    steps_two, steps_one = read_steps(tmp_path / "two"), read_steps(tmp_path / "one")
    assert [r["step"] for r in steps_two] == [1, 2]  # process 1 wrote nothing
    for key in KEYS:
        np.testing.assert_allclose([r[key] for r in steps_two], [r[key] for r in steps_one],
                                   rtol=1e-4, atol=1e-6, err_msg=key)
    assert steps_one[0]["grad_norm"] > 0 and steps_one[0]["loss"] != steps_one[1]["loss"]


@pytest.mark.slow  # three 2-process launches: minutes on 2 cores
def test_sigterm_to_one_process_stops_all_at_the_same_step_and_resumes(tmp_path):
    """SIGTERM to process 1 only: both finish the step, agree to stop, checkpoint it together and
    exit 0; started again, both resume from that checkpoint and finish."""
    workdir = tmp_path / "run"
    procs = launch_trainer(workdir, "--config.train.num_steps=1000")
    deadline = time.monotonic() + 900
    while not (os.path.exists(workdir / "metrics.jsonl") and read_steps(workdir)):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs)
    saved = int(re.search(r"saved step (\d+) and stopped", outputs[0]).group(1))
    assert "another process" in outputs[0]  # process 0 stopped on process 1's signal
    assert 1 <= saved < 1000 and str(saved) in os.listdir(workdir / "checkpoints")
    assert read_steps(workdir)[-1]["step"] == saved

    outputs = finish(launch_trainer(workdir, f"--config.train.num_steps={saved + 1}"))
    assert f"resumed from step {saved}" in outputs[0]
    assert [r["step"] for r in read_steps(workdir)][-2:] == [saved, saved + 1]
