"""Disaggregated placement in the trainer (`mesh.rollout_devices` = N > 0): on 8 CPU devices the
first 4 sample (a rollout mesh of its own shape: fsdp 2 × tensor 2) and the last 4 learn; the
weights reach the sampler after each update and the rollout batch comes back, device to device.
Reference: the colocated run (`mesh.rollout_devices = 0`, the trainer as it was) on 4 devices
with the same seed — the same rewards, losses and final parameters, at lag 0 and lag 1."""

import jax
import numpy as np
import pytest

from cfpo_jax import config as config_lib
from cfpo_jax import train
from tests.fixtures.runs import params_of, tiny

# What differs between two identical runs: wall times and what is derived from them.
TIMING = ("time_", "tokens_per_s", "weight_sync_s", "eta")


def _numbers(history):
    return [{k: v for k, v in h.items() if not k.startswith(TIMING)} for h in history]


@pytest.mark.slow  # two 3-step trainer runs per lag: ~1 min on the shared box
@pytest.mark.parametrize("lag", [0, 1])
def test_a_separate_rollout_mesh_trains_like_the_colocated_run(tmp_path, lag):
    overrides = dict(train__num_steps=3, rl__num_epochs=2, rl__max_staleness=lag)
    split = tiny(mesh__rollout_devices=4, mesh__rollout__fsdp=2, mesh__rollout__tensor=2,
                 **overrides)
    config_lib.validate(split)
    disaggregated = train.run(split, str(tmp_path / "split"))
    colocated = train.run(tiny(**overrides), str(tmp_path / "colocated"),
                          devices=jax.devices()[:4])

    sampler = disaggregated["state"]["params"]
    learner_devices = {d for x in jax.tree.leaves(sampler) for d in x.sharding.device_set}
    assert learner_devices == set(jax.devices()[4:])  # the state lives on the learner mesh
    got, want = _numbers(disaggregated["history"]), _numbers(colocated["history"])
    assert [sorted(h) for h in got] == [sorted(h) for h in want]
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert got[0]["reward_mean"] != got[-1]["reward_mean"] or got[0]["loss"] != got[-1]["loss"]
    for a, b in zip(params_of(disaggregated), params_of(colocated)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The move is timed every step; a colocated synchronous run has none to time.
    assert all(h["weight_sync_s"] > 0 for h in disaggregated["history"])
    assert lag or all("weight_sync_s" not in h for h in colocated["history"])


def test_bad_rollout_device_counts_are_refused(tmp_path):
    for overrides, message in [
            (dict(mesh__rollout_devices=-1), r"mesh.rollout_devices=-1: must be 0"),
            (dict(mesh__rollout_devices=2, mesh__distributed=True, rl__dynamic_sampling=True),
             r"mesh.rollout_placement='first' \(the sampler on processes of its own\) does not "
             r"support rl.dynamic_sampling"),
            (dict(mesh__rollout_placement="hosts"),
             r"mesh.rollout_placement='hosts': must be 'first' .* or 'per_process'"),
            (dict(mesh__rollout__tensor=0), r"mesh.rollout.tensor must be")]:
        with pytest.raises(ValueError, match=message):
            config_lib.validate(tiny(**overrides))
    # Known only with the devices: N must leave learner devices.
    with pytest.raises(ValueError, match=r"rollout_devices=8: must be 0 .* between 1 and 7"):
        train.run(tiny(mesh__rollout_devices=8), str(tmp_path))
