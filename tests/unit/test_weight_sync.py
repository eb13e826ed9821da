"""The learner -> rollout weight move (`cfpo_jax.weight_sync`): on one process (colocated copy,
device_put, the union program) and across 2 jax.distributed CPU processes (each mesh one process;
both meshes spanning both), checked against the numpy values each shard must hold."""

import collections
import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from cfpo_jax import sharding, weight_sync
from tests.fixtures.paths import ROOT
from tests.fixtures.processes import free_port, process_env

# Parameter kinds of the rule table, stacked like the model's blocks: the layouts differ per mesh.
SHAPES = {"embedding": (16, 8), "lm_head": (8, 16), "blocks": {"q_kernel": (2, 8, 4, 2),
                                                               "down_kernel": (2, 16, 8),
                                                               "scale": (2, 8)}}


def host_params():
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def placed(mesh, params):
    return jax.device_put(params, sharding.param_shardings(mesh, params))


def check_shards(out, expected, mesh):
    """Every addressable shard of `out` holds `expected` at its index, in `mesh`'s rule layout."""
    want_sh = sharding.param_shardings(mesh, expected)
    for got, want, sh in zip(jax.tree.leaves(out), jax.tree.leaves(expected), jax.tree.leaves(want_sh)):
        assert got.sharding.is_equivalent_to(sh, got.ndim), (got.sharding, sh)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


def mesh_config(rollout_devices, *, fsdp=-1, tensor=1, rollout_fsdp=-1, rollout_tensor=1):
    return ml_collections.ConfigDict(dict(
        data=1, fsdp=fsdp, tensor=tensor, expert=1, dcn=1, rollout_devices=rollout_devices,
        rollout_placement="first",
        rollout=dict(data=1, fsdp=rollout_fsdp, tensor=rollout_tensor)))


def test_split_devices_and_bad_counts():
    devices = jax.devices()
    assert sharding.split_devices(devices, 0) == (devices, devices)
    rollout, learner = sharding.split_devices(devices, 3)
    assert rollout == devices[:3] and learner == devices[3:]
    for bad in (-1, len(devices)):
        with pytest.raises(ValueError, match=f"rollout_devices={bad}"):
            sharding.split_devices(devices, bad)


def test_placement_rule_across_processes():
    """2 processes × 4 devices (stand-ins with a process index): 'first' takes the head of the
    process-major list (whole processes when N is a multiple of 4), 'per_process' the first
    N / 2 devices of each process, so both meshes span both."""
    Device = collections.namedtuple("Device", "id process_index")
    devices = [Device(i, i // 4) for i in range(8)]
    rollout, learner = sharding.split_devices(devices, 4, "first")
    assert [d.id for d in rollout] == [0, 1, 2, 3] and [d.id for d in learner] == [4, 5, 6, 7]
    rollout, learner = sharding.split_devices(devices, 4, "per_process")
    assert [d.id for d in rollout] == [0, 1, 4, 5] and [d.id for d in learner] == [2, 3, 6, 7]
    with pytest.raises(ValueError, match=r"rollout_devices=3 .* multiple of the 2 processes"):
        sharding.split_devices(devices, 3, "per_process")
    with pytest.raises(ValueError, match=r"rollout_placement='hosts': one of"):
        sharding.split_devices(devices, 4, "hosts")


def test_colocated_sync_is_a_copy_in_the_rollout_layout():
    rollout_mesh, learner_mesh = sharding.placement(mesh_config(0))
    assert rollout_mesh is learner_mesh
    expected = host_params()
    params = placed(learner_mesh, expected)
    sync = weight_sync.WeightSync(learner_mesh, rollout_mesh,
                                  sharding.param_shardings(rollout_mesh, params))
    out = sync(params)
    assert sync.method == "copy" and sync.seconds > 0
    check_shards(out, expected, rollout_mesh)
    # Own buffers: the learner may donate (delete) its params while the rollout samples.
    jax.tree.map(lambda a: a.delete(), params)
    check_shards(out, expected, rollout_mesh)


@pytest.mark.parametrize("method", [None, "union"])
def test_disaggregated_sync_on_one_process(method):
    """4 rollout devices (tensor=2 x fsdp=2) and 4 learner devices (fsdp=4): different layouts."""
    config = mesh_config(4, rollout_fsdp=2, rollout_tensor=2)
    rollout_mesh, learner_mesh = sharding.placement(config)
    assert set(rollout_mesh.devices.flat) == set(jax.devices()[:4])
    assert set(learner_mesh.devices.flat) == set(jax.devices()[4:])
    expected = host_params()
    params = placed(learner_mesh, expected)
    sync = weight_sync.WeightSync(learner_mesh, rollout_mesh,
                                  sharding.param_shardings(rollout_mesh, params), method=method)
    assert sync.method == (method or "device_put")
    for scale in (1.0, 2.0):  # a second move reuses the union program and its send buffers
        want = jax.tree.map(lambda x: x * scale, expected)
        out = sync(jax.tree.map(lambda x: x * scale, params))
        check_shards(out, want, rollout_mesh)


def test_batches_of_changing_shapes_move_back_to_the_learner_under_a_mesh_in_context():
    """A rollout batch (one NamedSharding for every leaf; its widths change from step to step)
    from the rollout mesh to the learner mesh through the union program, called with the
    learner mesh in context as the trainer does."""
    rollout_mesh, learner_mesh = sharding.placement(mesh_config(4, rollout_fsdp=2, rollout_tensor=2))
    to_learner = weight_sync.WeightSync(rollout_mesh, learner_mesh,
                                        sharding.batch_sharding(learner_mesh), method="union")
    rng = np.random.default_rng(1)
    with jax.set_mesh(learner_mesh):
        for width in (3, 5, 3):
            host = dict(tokens=rng.integers(0, 9, (16, width)).astype(np.int32),
                        logprobs=rng.standard_normal((16, width)).astype(np.float32))
            out = to_learner(jax.device_put(host, sharding.batch_sharding(rollout_mesh)))
            for name, want in host.items():
                assert out[name].sharding == sharding.batch_sharding(learner_mesh)
                for shard in out[name].addressable_shards:
                    np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


def test_union_needs_equal_halves():
    rollout_mesh, learner_mesh = sharding.placement(mesh_config(2))
    with pytest.raises(ValueError, match="2 rollout and 6 learner devices"):
        weight_sync.WeightSync(learner_mesh, rollout_mesh, None, method="union")


_WORKER = """
import json, sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
import numpy as np
from cfpo_jax import sharding, weight_sync
from tests.unit.test_weight_sync import host_params, placed, check_shards, mesh_config
devices = jax.devices()
if {interleave}:  # the first 4 devices take 2 from each process: both meshes span both
    devices = [devices[i] for i in (0, 1, 4, 5, 2, 3, 6, 7)]
rollout_mesh, learner_mesh = sharding.placement(
    mesh_config(4, rollout_fsdp=2, rollout_tensor=2), devices)
expected = host_params()
params = placed(learner_mesh, expected)
sync = weight_sync.WeightSync(learner_mesh, rollout_mesh,
                              sharding.param_shardings(rollout_mesh, params))
times = []
for scale in (1.0, 2.0, 3.0):
    out = sync(jax.tree.map(lambda x: x * scale, params))
    check_shards(out, jax.tree.map(lambda x: x * scale, expected), rollout_mesh)
    times.append(sync.seconds)
shards = sum(len(x.addressable_shards) for x in jax.tree.leaves(out))
print(json.dumps(dict(method=sync.method, shards=shards,
                      processes=sorted({{d.process_index for d in rollout_mesh.devices.flat}}),
                      weight_sync_s=times)))
"""


@pytest.mark.parametrize("interleave", [False, True], ids=["mesh-per-process", "meshes-span-both"])
def test_sync_across_two_processes(interleave):
    script = _WORKER.format(port=free_port(), interleave=interleave)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=process_env(4), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(r["method"] == "union" for r in results)
    if interleave:  # each process holds half the rollout mesh
        assert results[0]["processes"] == [0, 1] and results[0]["shards"] == results[1]["shards"] > 0
    else:  # process 0 is the rollout mesh, process 1 the learner: only 0 receives
        assert results[0]["processes"] == [0] and results[0]["shards"] > 0 == results[1]["shards"]
    print("weight_sync_s", [r["weight_sync_s"] for r in results])
