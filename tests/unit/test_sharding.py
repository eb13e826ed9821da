"""Mesh construction, the partition rule table, and sharded forwards on 8 fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cfpo_jax import config as config_lib
from cfpo_jax import policy, sampling, sharding
from cfpo_jax.models import decoding, default_positions, from_pretrained
from tests.fixtures import hf_fixtures

MESHES = [(8, 1), (4, 2), (2, 4)]  # (fsdp, tensor)


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def checkpoint(request, tmp_path_factory):
    directory = hf_fixtures.build_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    tokens = np.random.default_rng(1).integers(3, hf_fixtures.VOCAB_SIZE, (8, 16))
    mask = np.ones_like(tokens, dtype=np.int32)
    mask[1::2, :5] = 0  # half the rows left-padded
    unsharded = from_pretrained(directory)
    return directory, tokens, mask, np.asarray(unsharded(jnp.asarray(tokens), mask_BxT=jnp.asarray(mask)))


def test_make_mesh_fills_remaining_devices():
    mesh = sharding.make_mesh(data=2, fsdp=-1, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    mesh = sharding.make_mesh(fsdp=-1, expert=4)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    assert sharding.batch_shards(mesh) == 8


@pytest.mark.parametrize(
    "sizes, match",
    [(dict(data=3, fsdp=-1), "not divisible"), (dict(data=-1, fsdp=-1), "at most one -1"), (dict(fsdp=4), "needs 4")],
)
def test_make_mesh_rejects_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(**sizes)


def test_make_mesh_dcn_slices_span_the_data_axis():
    """mesh.dcn = 2 on 8 devices without slice ids: two slices of 4 consecutive devices, the data
    axis (2 × data 1) across them, fsdp × tensor (2 × 2) inside each; sizes are per slice."""
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=2, dcn=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
    # The run's mesh (cfpo_jax.policy.make_mesh) takes mesh.dcn from the config.
    config = config_lib.base_config()
    config.mesh.tensor, config.mesh.dcn = 2, 2
    config.data.batch_size, config.rl.group_size, config.rl.num_minibatches = 4, 2, 1
    assert dict(policy.make_mesh(config).shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    with pytest.raises(ValueError, match="mesh.dcn=3"):
        sharding.make_mesh(dcn=3)
    with pytest.raises(ValueError, match="per slice"):
        sharding.make_mesh(fsdp=8, dcn=2)


def test_make_mesh_dcn_follows_slice_ids_of_two_v5p_slices():
    """Two v5p-64 slices (libtpu's compile-only devices, 16 hosts): each row of the data axis is one
    slice, and every fsdp/tensor group lies inside one slice."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[compile]')")
    from cfpo_jax.aot import targets

    devices = targets.devices("v5p-64x2")
    assert len({d.process_index for d in devices}) == 16
    mesh = sharding.make_mesh(fsdp=-1, tensor=4, devices=devices, dcn=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "expert": 1, "tensor": 4}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()


@pytest.mark.parametrize("fsdp, tensor", MESHES)
def test_sharded_logits_equal_unsharded(checkpoint, fsdp, tensor):
    directory, tokens, mask, expected = checkpoint
    mesh = sharding.make_mesh(fsdp=fsdp, tensor=tensor)
    model = from_pretrained(directory, mesh=mesh)
    q_kernel = model.blocks.attn.q_kernel[...]
    assert q_kernel.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(q_kernel.addressable_shards) == 8
    assert q_kernel.addressable_shards[0].data.shape[1:3] == (64 // fsdp, 4 // tensor)
    batch = jax.device_put((tokens, mask), sharding.batch_sharding(mesh))
    logits = nnx.jit(lambda m, t, k: m(t, mask_BxT=k))(model, *batch)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_shard_model_places_every_parameter_by_the_rule_table(checkpoint):
    directory = checkpoint[0]
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    model = sharding.shard_model(from_pretrained(directory), mesh)
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        expected = sharding.partition_spec(mesh, names, value.shape)
        assert value.sharding.spec == expected, names
    # 2 kv heads do not divide tensor=4: that dimension stays whole instead of failing.
    assert model.blocks.attn.k_kernel[...].sharding.spec == P(None, "fsdp", None, None)
    assert model.blocks.attn.q_kernel[...].sharding.spec == P(None, "fsdp", "tensor", None)


def test_sharded_sampler_decode_equals_unsharded(checkpoint):
    """The sampler's slot cache on a fsdp x tensor mesh: slots over the batch axes, kv heads over
    'tensor'; its prefill (13-token prompts, half left-padded) and first decode step give the
    unsharded forward's logits."""
    directory, tokens, mask, expected = checkpoint
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    model = from_pretrained(directory, mesh=mesh)
    prompt_len = 13
    settings = sampling.Settings(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, eos_token_ids=(2,),
                                 pad_id=0, mesh=mesh, attention="einsum")
    weights = decoding.gather_weights(model, mesh)
    slots, _ = sampling.init_program(settings, model.config, 8, 16, 8)
    slot_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None))
    assert all(c.sharding.is_equivalent_to(slot_sharding, 4) for c in slots.cache.k + slots.cache.v)
    rows = np.arange(8, dtype=np.int32)
    slots = sampling.prefill_program(settings, weights, slots, tokens[:, :prompt_len], mask[:, :prompt_len], rows, rows)
    column = np.asarray(default_positions(jnp.asarray(mask)))[:, prompt_len - 1]  # rows are left-aligned
    step = jax.jit(functools.partial(decoding.decode_step, implementation="einsum"))
    logits, cache = step(weights, slots.token_K, slots.cache, jnp.asarray(column))
    assert all(c.sharding.is_equivalent_to(slot_sharding, 4) for c in cache.k + cache.v)
    np.testing.assert_allclose(np.asarray(logits), expected[:, prompt_len - 1], rtol=0, atol=1e-5 * np.abs(expected).max())


def test_unknown_parameter_kind_names_the_valid_ones():
    mesh = sharding.make_mesh()
    with pytest.raises(KeyError, match="q_kernel"):
        sharding.partition_spec(mesh, ["blocks", "attn", "rotary"], (2, 4))


def test_distributed_init_only_when_enabled_with_the_given_cluster(monkeypatch):
    from cfpo_jax import config as config_lib

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    mesh = config_lib.base_config().mesh
    sharding.initialize_distributed(mesh)
    assert calls == []
    mesh.distributed = True
    sharding.initialize_distributed(mesh)  # auto-detection: nothing given
    mesh.coordinator_address, mesh.num_processes, mesh.process_id = "127.0.0.1:1234", 2, 1
    sharding.initialize_distributed(mesh)
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None),
                     dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)]
