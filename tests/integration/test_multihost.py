"""Multi-process runs through jax.distributed on localhost (127.0.0.1 only): 4 CPU processes × 2
devices each (and 2 × 4), compared with 1 process × 8 devices; the mesh's fsdp axis spans the
processes (quickstart's `mesh.fsdp = -1`: 8-way over all of them)."""

import json
import os
import re
import shutil
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


def launch_trainer(workdir, *overrides, processes=2, devices=None):
    """`python -m cfpo_jax.train` as `processes` jax.distributed processes of `devices` CPU devices
    each (default: 8 devices in all), or one process without jax.distributed when processes=1;
    each one's output goes to <workdir>.<i>.log."""
    devices = devices or 8 // processes
    base = [sys.executable, "-m", "cfpo_jax.train", "--config=configs/quickstart.py",
            f"--workdir={workdir}", *TRAIN_ARGS, *overrides]
    port = free_port()
    procs = []
    for i in range(processes):
        args = base if processes == 1 else base + [
            "--config.mesh.distributed=True", f"--config.mesh.coordinator_address=127.0.0.1:{port}",
            f"--config.mesh.num_processes={processes}", f"--config.mesh.process_id={i}"]
        log = open(f"{workdir}.{i}.log", "a")
        procs.append(subprocess.Popen(args, env=process_env(devices), cwd=ROOT,
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


def assert_same_steps(steps, expected):
    assert [r["step"] for r in steps] == [r["step"] for r in expected]
    for key in KEYS:
        np.testing.assert_allclose([r[key] for r in steps], [r[key] for r in expected],
                                   rtol=1e-4, atol=1e-6, err_msg=key)


def resume_from_step_1(saved_workdir, workdir, *overrides, processes, devices):
    """A new run in `workdir` that starts from `saved_workdir`'s checkpoint of step 1 (its later
    ones left out) and trains step 2 with `processes` × `devices` and the mesh `overrides`."""
    shutil.copytree(saved_workdir / "checkpoints", workdir / "checkpoints",
                    ignore=lambda d, names: [n for n in names if d.endswith("checkpoints") and n == "2"])
    outputs = finish(launch_trainer(workdir, "--config.train.num_steps=2", *overrides,
                                    processes=processes, devices=devices))
    assert "resumed from step 1" in outputs[0], outputs[0][-3000:]
    return read_steps(workdir)


@pytest.mark.slow  # 4 + 1 + 2 trainer processes: 851 s on the loaded 2-core box (issue 33)
def test_four_processes_train_like_one_process_and_restore_on_two_with_another_mesh(tmp_path):
    """4 processes × 2 devices (fsdp 8 across them) and 1 process × 8 devices: the same first steps
    (losses, gradient norms, rewards); one metrics file, written once per step. The 4 processes'
    checkpoint of step 1 (each wrote its own shards) restores on 2 processes × 4 devices with a
    different mesh — each process a slice (`mesh.dcn` = 2: data 2 across them, fsdp 2 × tensor 2
    inside) — whose step 2 is the 4 processes' step 2."""
    four = launch_trainer(tmp_path / "four", "--config.train.num_steps=2",
                          "--config.train.checkpoint_every=1", processes=4)
    one = launch_trainer(tmp_path / "one", "--config.train.num_steps=2", processes=1)
    finish(four + one)
    steps_four, steps_one = read_steps(tmp_path / "four"), read_steps(tmp_path / "one")
    assert [r["step"] for r in steps_four] == [1, 2]  # processes 1-3 wrote nothing
    assert_same_steps(steps_four, steps_one)
    assert steps_one[0]["grad_norm"] > 0 and steps_one[0]["loss"] != steps_one[1]["loss"]

    steps_two = resume_from_step_1(tmp_path / "four", tmp_path / "two", "--config.mesh.dcn=2",
                                   "--config.mesh.tensor=2", processes=2, devices=4)
    assert_same_steps(steps_two, steps_four[1:])


@pytest.mark.slow  # a 4-process and a 1-process launch
def test_checkpoint_of_four_processes_restores_on_one_process_with_another_mesh(tmp_path):
    """The 4 processes' checkpoint of step 1 restores in one process of 4 devices on a mesh of
    data 2 × fsdp 2: its step 2 is the 4 processes' step 2."""
    finish(launch_trainer(tmp_path / "four", "--config.train.num_steps=2",
                          "--config.train.checkpoint_every=1", processes=4))
    steps_four = read_steps(tmp_path / "four")
    steps_one = resume_from_step_1(tmp_path / "four", tmp_path / "one", "--config.mesh.data=2",
                                   "--config.mesh.fsdp=2", processes=1, devices=4)
    assert_same_steps(steps_one, steps_four[1:])


# The expert axis spanning processes (issue 33, with the MoE model): a 4-process run of a MoE
# config whose `expert` mesh axis crosses process boundaries, against one process, goes here.


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
