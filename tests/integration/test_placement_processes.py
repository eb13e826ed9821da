"""Disaggregated placement across processes (issue 32, `mesh.rollout_devices` with
`mesh.distributed`): the trainer as 2 jax.distributed CPU processes, the weights and the rollout
batches moving between the meshes through `weight_sync`'s union program.

Two layouts (`sharding.placement`): the rollout mesh one process of its own
(`mesh.rollout_placement='first'`: process 0 samples, process 1 learns and alone holds the state,
checkpointed as a host copy), and both meshes spanning both processes ('per_process': devices
0-1 of each process sample, 2-3 learn). Reference: the colocated trainer as it was, one process on as
many devices as the learner mesh, same seed — the same rewards, losses, every other non-timing
metric, at lag 0 and lag 1 (whose producer runs without a thread across processes, in one
order)."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.fixtures.processes import finish, launch_trainer, read_steps

# What differs between two identical runs: wall times and what is derived from them.
TIMING = ("time_", "tokens_per_s", "weight_sync_s", "eta")
RUN = ("--config.rl.num_epochs=2", "--config.train.checkpoint_every=1", "--config.train.export_hf=False")


def _numbers(steps):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in steps]


def _final_params(workdir, step):
    """The parameters in `workdir`'s checkpoint of `step`, as numpy (read back whatever mesh and
    processes wrote them)."""
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata.tree["params"]
        target = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved)}
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=as_numpy, partial_restore=True))
    return jax.tree.leaves(restored)


def _assert_same_params(got, want):
    """Within 1e-5: the gradients' reductions run in another order across processes (gloo), which
    moves a few of the small parameters by ~2e-6 after 3 steps."""
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _assert_same_numbers(got, want):
    got, want = _numbers(got), _numbers(want)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {w['step']}: {key}")
    assert len(got) == 1 or got[0]["loss"] != got[-1]["loss"]  # the steps are not all alike


@pytest.mark.slow  # 2 + 1 processes for 3 steps, then 2 resuming for 1: ~3 min on 2 cores
@pytest.mark.parametrize("lag", [0, 1])
def test_a_sampler_process_of_its_own_trains_like_colocated_and_resumes(tmp_path, lag):
    """2 processes × 2 devices, `mesh.rollout_devices=2`: the rollout mesh is process 0, the
    learner mesh process 1. Three steps; then a new launch resumes from a copy of its checkpoint
    of step 2 (the state as a host copy, at lag 1 the queued rollout of step 3 with it) and
    trains step 3 again; against 3 colocated steps on one process of 2 devices."""
    split, resumed, colocated = tmp_path / "split", tmp_path / "resumed", tmp_path / "colocated"
    args = (*RUN, f"--config.rl.max_staleness={lag}", "--config.train.num_steps=3")
    procs = launch_trainer(split, *args, "--config.mesh.rollout_devices=2", processes=2, devices=2)
    reference = launch_trainer(colocated, *args, processes=1, devices=2)
    finish(procs + reference)
    shutil.copytree(split / "checkpoints", resumed / "checkpoints",
                    ignore=lambda d, names: [n for n in names if d.endswith("checkpoints") and n == "3"])
    outputs = finish(launch_trainer(resumed, *args, "--config.mesh.rollout_devices=2",
                                    processes=2, devices=2))
    assert "resumed from step 2" in outputs[0], outputs[0][-3000:]

    steps, want = read_steps(split), read_steps(colocated)
    assert [r["step"] for r in steps] == [1, 2, 3]
    _assert_same_numbers(steps, want)
    _assert_same_numbers(read_steps(resumed), want[2:])
    assert all(r["weight_sync_s"] > 0 for r in steps)  # timed every step
    _assert_same_params(_final_params(split, 3), _final_params(colocated, 3))
    _assert_same_params(_final_params(resumed, 3), _final_params(colocated, 3))
    if lag:
        assert [r["staleness_max"] for r in steps] == [0, 1, 1]


@pytest.mark.slow  # 2 + 1 processes for 3 steps: ~2 min on 2 cores
def test_meshes_spanning_both_processes_train_like_colocated(tmp_path):
    """2 processes × 4 devices, `mesh.rollout_devices=4` with `mesh.rollout_placement=
    'per_process'`: devices 0-1 of each process sample, 2-3 learn, so both meshes span both
    processes; lag 1. Against the colocated run on one process of 4 devices."""
    split, colocated = tmp_path / "split", tmp_path / "colocated"
    common = (*RUN, "--config.rl.max_staleness=1", "--config.train.num_steps=3")
    procs = launch_trainer(split, *common, "--config.mesh.rollout_devices=4",
                           "--config.mesh.rollout_placement=per_process", processes=2, devices=4)
    reference = launch_trainer(colocated, *common, processes=1, devices=4)
    finish(procs + reference)
    steps = read_steps(split)
    _assert_same_numbers(steps, read_steps(colocated))
    assert all(r["weight_sync_s"] > 0 for r in steps)
    _assert_same_params(_final_params(split, 3), _final_params(colocated, 3))
