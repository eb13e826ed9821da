"""Multi-process runs through jax.distributed on localhost (127.0.0.1 only): 4 CPU processes × 2
devices each (and 2 × 4), compared with 1 process × 8 devices; the mesh's fsdp axis spans the
processes (quickstart's `mesh.fsdp = -1`: 8-way over all of them), and with the tiny mixture of
experts the `expert` axis too."""

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
from tests.fixtures.processes import finish, free_port, launch_trainer, process_env, read_steps
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


@pytest.mark.slow  # a 4-process and a 1-process launch of the tiny MoE: 326 s on the 2-core box beside a compile
def test_four_processes_with_the_expert_axis_across_them_train_like_one_process(tmp_path):
    """The tiny mixture of experts (configs/math_qwen3_moe.py:tiny: 8 experts, 2 per token) on a
    mesh of fsdp 2 × expert 4, run by 4 processes × 2 devices and by 1 process × 8 devices: the
    same first steps. An expert group (4 devices) spans at least 2 of the 4 processes whatever
    the device order, and in the mesh's process-major order each fsdp pair spans two; so the MoE
    layer's token all-gather and reduce-scatter over 'expert' (`cfpo_jax.models.moe`) and the
    fsdp gathers of the expert weights cross processes."""
    args = ["--config.train.num_steps=2", "--config.mesh.expert=4", "--config.mesh.fsdp=-1"]
    four = launch_trainer(tmp_path / "four", *args, processes=4, config="configs/math_qwen3_moe.py:tiny")
    one = launch_trainer(tmp_path / "one", *args, processes=1, config="configs/math_qwen3_moe.py:tiny")
    finish(four + one)
    for run in ("four", "one"):  # the model trained is the mixture of experts
        with open(tmp_path / run / "tiny_model" / "config.json") as f:
            assert json.load(f)["model_type"] == "qwen3_moe"
    steps_four, steps_one = read_steps(tmp_path / "four"), read_steps(tmp_path / "one")
    assert [r["step"] for r in steps_four] == [1, 2]  # processes 1-3 wrote nothing
    assert_same_steps(steps_four, steps_one)
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
