"""cfpo_jax.models.attention.decode_attention against a numpy formula: each row attends over
exactly its slots [0, length), grouped-query heads. On CPU the Pallas kernels run in Pallas'
interpreters: the GPU flash-decoding kernel in the Triton interpreter, the TPU paged-attention
kernel in TPU interpret mode (which simulates its DMAs and semaphores); "native" is the C++ CPU
kernel (cfpo_jax.models.cpu_kernel), built here by the host's compiler."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cfpo_jax.models import attention, cpu_kernel
from cfpo_jax.models.attention import decode_attention, resolve_decode
from cfpo_jax.sharding import make_mesh

needs_compiler = pytest.mark.skipif(cpu_kernel._compiler() is None,
                                    reason="no C++ compiler on this host to build the 'native' CPU kernel")

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


@pytest.mark.parametrize("implementation", ["einsum", "reduce", pytest.param("native", marks=needs_compiler),
                                            "pallas", "paged"])
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


@needs_compiler
@pytest.mark.parametrize("head_dim", [64, 128, 20])  # compiled-in widths; 20: 16 lanes + a tail
@pytest.mark.parametrize("q_dtype,cache_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                                 (jnp.bfloat16, jnp.float32)])
def test_native_kernel_matches_numpy_and_the_reduce_kernel(head_dim, q_dtype, cache_dtype):
    """The C++ kernel against numpy in float64 and against "reduce" (the same sums in another
    order; bfloat16 q: both round the probabilities and the output to bfloat16, so they agree
    within one bfloat16 step of the output). bfloat16 q with a float32 cache holding bfloat16
    values is the sampler's CPU layout (`decoding.cache_dtype`); garbage past each length."""
    rng = np.random.default_rng(5)
    lengths = np.array([1, 17, 143, 80, 64, 2])
    q = jnp.asarray(rng.normal(size=(6, N, head_dim)), q_dtype)
    k, v = (np.asarray(jnp.asarray(rng.normal(size=(6, K, 143, head_dim)), jnp.bfloat16), np.float32) for _ in "kv")
    for b, n in enumerate(lengths):
        k[b, :, n:] = v[b, :, n:] = np.nan  # read past a length, these would poison the row
    k, v = jnp.asarray(k, cache_dtype), jnp.asarray(v, cache_dtype)
    native = jax.jit(functools.partial(decode_attention, implementation="native"))(q, k, v, jnp.asarray(lengths))
    assert native.dtype == q_dtype and native.shape == q.shape
    expected = numpy_decode_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), lengths)
    atol = 2e-5 if q_dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(native, np.float64), expected, atol=atol)
    reduce = decode_attention(q, jnp.nan_to_num(k), jnp.nan_to_num(v), jnp.asarray(lengths), implementation="reduce")
    np.testing.assert_allclose(np.asarray(native, np.float32), np.asarray(reduce, np.float32),
                               atol=1e-5 if q_dtype == jnp.float32 else 1.6e-2)


@needs_compiler
def test_native_kernel_rows_do_not_depend_on_their_batch():
    """A row's output is the same bits alone as among others (the sampler's token identity across
    batch schedules): the kernel's threads split rows, never a row's sums."""
    q, k, v = (jnp.asarray(x) for x in inputs(jnp.bfloat16, seed=6))
    native = functools.partial(decode_attention, implementation="native")
    together = native(q, k, v, jnp.asarray(LENGTHS))
    for b in range(B):
        alone = native(q[b:b + 1], k[b:b + 1], v[b:b + 1], jnp.asarray(LENGTHS[b:b + 1]))
        np.testing.assert_array_equal(np.asarray(alone[0], np.float32), np.asarray(together[b], np.float32))


@needs_compiler
def test_native_kernel_rejects_an_unsupported_dtype():
    x = jnp.zeros((1, 2, 4), jnp.float16)
    with pytest.raises(Exception, match="float32 or bfloat16"):
        jax.block_until_ready(decode_attention(x, jnp.zeros((1, 1, 8, 4), jnp.float16),
                                               jnp.zeros((1, 1, 8, 4), jnp.float16), jnp.ones(1, jnp.int32),
                                               implementation="native"))


@needs_compiler
def test_native_kernel_rejects_lengths_not_one_per_row():
    x = jnp.zeros((2, 2, 4))
    with pytest.raises(Exception, match=r"length \[B\]"):
        jax.block_until_ready(cpu_kernel.decode_attention(x, jnp.zeros((2, 1, 8, 4)), jnp.zeros((2, 1, 8, 4)),
                                                          jnp.ones(3, jnp.int32)))


@needs_compiler
def test_native_kernel_build_is_cached_per_cpu_and_atomic(tmp_path, monkeypatch):
    """A build lands under its hash in the cache directory with no partial file left; a second
    call finds it without compiling; a missing compiler is a clear error."""
    monkeypatch.setenv("CFPO_JAX_KERNEL_CACHE", str(tmp_path))
    path = cpu_kernel._build()
    assert os.path.dirname(path) == str(tmp_path) and os.listdir(tmp_path) == [os.path.basename(path)]

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_kernel.subprocess, "run", no_compile)
    assert cpu_kernel._build() == path
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        cpu_kernel._build()


def test_without_the_native_kernel_cpu_falls_back_to_reduce(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "available", lambda: (False, "no C++ compiler found"))
    assert resolve_decode("auto", jnp.bfloat16, 64, platform="cpu") == "reduce"
    x = jnp.zeros((1, 2, 4))
    with pytest.raises(RuntimeError, match="'native' decode attention kernel is unavailable: no C.. compiler"):
        decode_attention(x, jnp.zeros((1, 1, 8, 4)), jnp.zeros((1, 1, 8, 4)), jnp.ones(1, jnp.int32),
                         implementation="native")


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


@pytest.mark.parametrize("implementation", ["paged", pytest.param("native", marks=needs_compiler)])
def test_kernel_per_batch_shard_equals_one_device(implementation):
    """With a mesh in context (the sampler's) the kernel runs per ('data', 'fsdp') shard of the
    rows and per 'tensor' shard of the kv heads (shard_map), with the same numbers as on one device."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    lengths = np.array([1, 130, 512, 77, 300, 5, 256, 128])
    q, k, v = (jnp.asarray(x) for x in inputs(jnp.bfloat16, seed=3, lengths=lengths, batch=8))
    kernel = functools.partial(decode_attention, implementation=implementation)
    expected = jax.jit(kernel)(q, k, v, jnp.asarray(lengths))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    sharded = jax.device_put((q, k, v, jnp.asarray(lengths)), rows)
    step = jax.jit(kernel)
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(step)(*sharded))
        out = step(*sharded)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


@needs_compiler
def test_auto_picks_the_platform_kernel():
    assert resolve_decode("auto", jnp.bfloat16, 128, platform="gpu") == "pallas"
    assert resolve_decode("auto", jnp.bfloat16, 128, platform="tpu") == "paged"
    # The paged kernel reads keys/values as bfloat16, and is tested upstream for head_dim 128/256.
    assert resolve_decode("auto", jnp.float32, 128, platform="tpu") == "einsum"
    assert resolve_decode("auto", jnp.bfloat16, 64, platform="tpu") == "einsum"
    assert resolve_decode("auto", jnp.bfloat16, 128, platform="cpu") == "native"
    assert resolve_decode("auto", jnp.float16, 128, platform="cpu") == "reduce"  # the C++ kernel reads f32/bf16
    with pytest.raises(ValueError, match="'native' is a CPU kernel"):
        resolve_decode("native", jnp.bfloat16, 128, platform="gpu")
    with pytest.raises(ValueError, match="'paged' needs a TPU"):
        resolve_decode("paged", jnp.bfloat16, 128, platform="gpu")
    with pytest.raises(ValueError, match="'pallas' needs a GPU"):
        resolve_decode("pallas", jnp.bfloat16, 128, platform="tpu")


def test_unknown_implementation_is_named():
    x = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="'flash'.*auto, einsum, reduce, native, pallas, paged"):
        decode_attention(x, jnp.zeros((1, 1, 128, 4)), jnp.zeros((1, 1, 128, 4)), jnp.ones(1, int),
                         implementation="flash")
