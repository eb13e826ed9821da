"""cfpo_jax.models.attention.decode_attention against a numpy formula: each row attends over
exactly its slots [0, length), grouped-query heads. On CPU the Pallas kernels run in Pallas'
interpreters: the GPU flash-decoding kernel in the Triton interpreter, the TPU paged-attention
kernel in TPU interpret mode (which simulates its DMAs and semaphores)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cfpo_jax.models import attention
from cfpo_jax.models.attention import decode_attention, resolve_decode
from cfpo_jax.sharding import make_mesh

B, N, K, S, H = 4, 6, 2, 512, 16  # 3 query heads per kv head; 4 pages of 128 slots
LENGTHS = np.array([1, 130, 512, 77])  # one slot, across a page boundary, every slot, mid-page


def numpy_decode_attention(q, k, v, length):
    B, N, H = q.shape
    K = k.shape[1]
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            keys, values = k[b, n // (N // K), : length[b]], v[b, n // (N // K), : length[b]]
            scores = keys @ q[b, n] / np.sqrt(H)
            probs = np.exp(scores - scores.max())
            out[b, n] = probs / probs.sum() @ values
    return out


def inputs(dtype, seed=0, lengths=LENGTHS, batch=B):
    """q, k, v with garbage (huge values) past each row's length, which must not leak in."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, N, H)).astype(dtype)
    k = rng.normal(size=(batch, K, S, H)).astype(dtype)
    v = rng.normal(size=(batch, K, S, H)).astype(dtype)
    for b in range(batch):
        k[b, :, lengths[b]:] = v[b, :, lengths[b]:] = 1e4
    return q, k, v


@pytest.mark.parametrize("implementation", ["einsum", "reduce", "pallas", "paged"])
def test_each_row_reads_exactly_its_valid_slots(implementation):
    # Keys/values exact in bfloat16: the paged kernel reads them as bfloat16 whatever their dtype.
    q, k, v = inputs(jnp.bfloat16)
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    got = decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(LENGTHS),
                           implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), numpy_decode_attention(q, k, v, LENGTHS), atol=2e-5)


def test_paged_kernel_in_bfloat16_matches_the_einsum_path_and_numpy():
    q, k, v = (jnp.asarray(x) for x in inputs(jnp.bfloat16, seed=1))
    lengths = jnp.asarray(LENGTHS)
    paged = jax.jit(functools.partial(decode_attention, implementation="paged"))(q, k, v, lengths)
    einsum = jax.jit(functools.partial(decode_attention, implementation="einsum"))(q, k, v, lengths)
    assert paged.dtype == jnp.bfloat16
    expected = numpy_decode_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), LENGTHS)
    # bfloat16 output: 8 bits of mantissa, |out| < 4 here. The einsum path also rounds the
    # probabilities to bfloat16 before the second product (the kernel keeps them float32).
    np.testing.assert_allclose(np.asarray(paged, np.float32), expected, atol=2e-2)
    np.testing.assert_allclose(np.asarray(paged, np.float32), np.asarray(einsum, np.float32), atol=3e-2)


def test_reduce_kernel_in_bfloat16_matches_numpy():
    """The CPU kernel with a bfloat16 cache: float32 products and sums, the probabilities rounded
    to bfloat16 as the einsum path rounds them, against numpy in float64."""
    q, k, v = (jnp.asarray(x) for x in inputs(jnp.bfloat16, seed=4))
    got = jax.jit(functools.partial(decode_attention, implementation="reduce"))(q, k, v, jnp.asarray(LENGTHS))
    assert got.dtype == jnp.bfloat16
    expected = numpy_decode_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), LENGTHS)
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=2e-2)


def test_paged_kernel_runs_free_of_data_races(monkeypatch):
    """jax's own test of this kernel is skipped upstream for data races (with megacore modes);
    the way it runs here (one core, sequential grid) is checked with the interpreter's race
    detector, which saw the kernel's reads."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call
    from jax.experimental.pallas import tpu as pltpu

    monkeypatch.setattr(attention, "_tpu_interpret_params", pltpu.InterpretParams(detect_races=True))
    q, k, v = (jnp.asarray(x) for x in inputs(jnp.bfloat16, seed=2))
    out = decode_attention(q, k, v, jnp.asarray(LENGTHS), implementation="paged")
    out.block_until_ready()
    races = interpret_pallas_call.races
    assert races is not None and races.reads, "the race detector did not run"
    assert not races.races_found
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_paged_kernel_per_batch_shard_equals_one_device():
    """With a mesh in context (the sampler's) the kernel runs per ('data', 'fsdp') shard of the
    rows and per 'tensor' shard of the kv heads (shard_map), with the same numbers as on one device."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    lengths = np.array([1, 130, 512, 77, 300, 5, 256, 128])
    q, k, v = (jnp.asarray(x) for x in inputs(jnp.bfloat16, seed=3, lengths=lengths, batch=8))
    paged = functools.partial(decode_attention, implementation="paged")
    expected = jax.jit(paged)(q, k, v, jnp.asarray(lengths))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    sharded = jax.device_put((q, k, v, jnp.asarray(lengths)), rows)
    step = jax.jit(paged)
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(step)(*sharded))
        out = step(*sharded)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


def test_auto_picks_the_platform_kernel():
    assert resolve_decode("auto", jnp.bfloat16, 128, platform="gpu") == "pallas"
    assert resolve_decode("auto", jnp.bfloat16, 128, platform="tpu") == "paged"
    # The paged kernel reads keys/values as bfloat16, and is tested upstream for head_dim 128/256.
    assert resolve_decode("auto", jnp.float32, 128, platform="tpu") == "einsum"
    assert resolve_decode("auto", jnp.bfloat16, 64, platform="tpu") == "einsum"
    assert resolve_decode("auto", jnp.bfloat16, 128, platform="cpu") == "reduce"
    with pytest.raises(ValueError, match="'paged' needs a TPU"):
        resolve_decode("paged", jnp.bfloat16, 128, platform="gpu")
    with pytest.raises(ValueError, match="'pallas' needs a GPU"):
        resolve_decode("pallas", jnp.bfloat16, 128, platform="tpu")


def test_unknown_implementation_is_named():
    x = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="'flash'.*auto, einsum, reduce, pallas, paged"):
        decode_attention(x, jnp.zeros((1, 1, 128, 4)), jnp.zeros((1, 1, 128, 4)), jnp.ones(1, int),
                         implementation="flash")
