"""The attention kernels against a float64 numpy attention written here (the independent reference).

The einsum path and the TPU splash kernel (in Pallas interpret mode) run on CPU; cuDNN needs a GPU.
All cases have GQA (4 query heads on 2 kv heads) and a left-padded row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfpo_jax.models import attention


def numpy_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT):
    """Causal softmax attention in float64 over the keys of the query's own segment (the mask
    holds segment ids: 0 padding, 1 the real tokens of an unpacked row, 1, 2, ... the sequences of
    a packed row); rows of padding queries stay zero."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))
    B, T, N, H = q.shape
    group = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        segment = np.asarray(mask_BxT[b])
        for n in range(N):
            scores = q[b, :, n] @ k[b, :, n // group].T / np.sqrt(H)
            for t in np.flatnonzero(segment != 0):
                allowed = (segment == segment[t]) & (np.arange(T) <= t)
                p = np.exp(scores[t, allowed] - scores[t, allowed].max())
                out[b, t, n] = (p / p.sum()) @ v[b, allowed, n // group]
    return out


def inputs(T, dtype, B=2, N=4, K=2, H=32, pad=(0, 37), seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, heads, H)), dtype) for heads in (N, K, K))
    mask = np.ones((B, T), np.int32)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return q, k, v, jnp.asarray(mask)


def real_rows(x, mask):
    return np.asarray(x, np.float64)[np.asarray(mask, bool)]


@pytest.mark.parametrize("implementation", ["einsum", "splash"])
def test_causal_attention_matches_numpy(implementation):
    """float32, T = 100 (splash pads it to its 128 block), one row with 37 padding tokens."""
    q, k, v, mask = inputs(100, jnp.float32)
    out = jax.jit(lambda *a: attention.causal_attention(*a, implementation=implementation))(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()  # padding rows too
    np.testing.assert_allclose(real_rows(out, mask), real_rows(numpy_attention(q, k, v, mask), mask), atol=2e-5)


def packed_segments(T, lengths_per_row):
    """Segment ids [B, T]: each row's sequences end to end (1, 2, ...), then padding (0)."""
    segment = np.zeros((len(lengths_per_row), T), np.int32)
    for row, lengths in enumerate(lengths_per_row):
        ends = np.cumsum(lengths)
        for k, (start, end) in enumerate(zip(ends - lengths, ends), start=1):
            segment[row, start:end] = k
    return jnp.asarray(segment)


@pytest.mark.parametrize("implementation", ["einsum", "splash"])
def test_packed_rows_attend_within_their_sequences(implementation):
    """Packed rows (segment ids): each sequence attends only to itself, as numpy computes it, and
    a sequence's output does not change when its neighbour's tokens do."""
    q, k, v, _ = inputs(100, jnp.float32)
    segment = packed_segments(100, [[30, 1, 45], [60, 25]])
    run = jax.jit(lambda *a: attention.causal_attention(*a, implementation=implementation))
    out = run(q, k, v, segment)
    np.testing.assert_allclose(real_rows(out, segment), real_rows(numpy_attention(q, k, v, segment), segment),
                               atol=2e-5)
    # New keys and values for the first sequence of each row: the others' outputs are unchanged.
    first = (segment == 1)[:, :, None, None]
    k2, v2 = jnp.where(first, k + 1.0, k), jnp.where(first, -v, v)
    out2 = run(q, k2, v2, segment)
    later = np.asarray(segment > 1)
    np.testing.assert_array_equal(np.asarray(out2)[later], np.asarray(out)[later])
    assert not np.allclose(np.asarray(out2)[np.asarray(segment == 1)], np.asarray(out)[np.asarray(segment == 1)])


def test_splash_gradients_match_einsum():
    """The splash backward kernels (interpret mode) against autodiff of the einsum path, through a
    loss over real rows only; bfloat16 inputs, float32 softmax in both."""
    q, k, v, mask = inputs(128, jnp.bfloat16, N=2, K=1, H=16)
    weight = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * mask[:, :, None, None]

    def loss(implementation, q, k, v):
        out = attention.causal_attention(q, k, v, mask, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * weight)

    splash = jax.jit(jax.grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2)))(q, k, v)
    einsum = jax.jit(jax.grad(lambda *a: loss("einsum", *a), argnums=(0, 1, 2)))(q, k, v)
    for name, got, want in zip("qkv", splash, einsum):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-2, (name, err)


def test_splash_runs_per_batch_shard_under_a_mesh():
    """On 8 (fake) devices with the mesh in context, splash runs under shard_map on each device's
    rows and gives the numpy result with the batch sharding kept."""
    from jax.sharding import NamedSharding, PartitionSpec

    from cfpo_jax import sharding

    mesh = sharding.make_mesh(1, -1, 1)
    q, k, v, mask = inputs(128, jnp.float32, B=8, pad=(0, 50, 0, 0, 127, 0, 0, 3))
    batch_sh = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    q, k, v, mask_d = (jax.device_put(x, batch_sh) for x in (q, k, v, mask))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda *a: attention.causal_attention(*a, implementation="splash"))
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, mask_d))
        out = fn(q, k, v, mask_d)
    assert out.sharding.is_equivalent_to(batch_sh, out.ndim)
    np.testing.assert_allclose(real_rows(out, mask), real_rows(numpy_attention(q, k, v, mask), mask), atol=2e-5)


def test_cudnn_matches_reference_in_bfloat16():
    """On a GPU: cuDNN flash attention (forward and gradients) against the einsum path in bf16."""
    if jax.default_backend() != "gpu":
        pytest.skip(
            "cuDNN flash attention needs a GPU; this run's backend is "
            f"{jax.default_backend()!r} (tests/conftest.py defaults JAX_PLATFORMS to cpu: run "
            "JAX_PLATFORMS=cuda,cpu python -m pytest tests/unit/models/test_attention.py on a GPU machine)"
        )
    q, k, v, mask = inputs(512, jnp.bfloat16, B=5, N=8, K=2, H=128, pad=(0, 37, 300, 511, 0))
    # The last row is packed: three sequences, then padding (block-diagonal mask).
    mask = mask.at[4].set(packed_segments(512, [[200, 7, 250]])[0])
    assert attention.resolve("auto", jnp.bfloat16, 128) == "cudnn"
    fused = jax.jit(lambda *a: attention.causal_attention(*a, implementation="cudnn"))(q, k, v, mask)
    reference = numpy_attention(q, k, v, mask)
    assert np.isfinite(np.asarray(fused, np.float32)).all()
    np.testing.assert_allclose(real_rows(fused, mask), real_rows(reference, mask), atol=2e-2)
    weight = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * mask[:, :, None, None]

    def grads(implementation):
        loss = lambda q, k, v: jnp.sum(
            attention.causal_attention(q, k, v, mask, implementation=implementation).astype(jnp.float32) * weight)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, got, want in zip("qkv", grads("cudnn"), grads("einsum")):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() / np.abs(want).max() < 2e-2, name


def test_auto_picks_the_platform_kernel_and_bad_names_fail():
    assert attention.resolve("auto", jnp.bfloat16, 128, platform="gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, 128, platform="gpu") == "einsum"  # cuDNN: bf16/fp16 only
    assert attention.resolve("auto", jnp.float32, 128, platform="tpu") == "splash"
    assert attention.resolve("auto", jnp.bfloat16, 64, platform="tpu") == "einsum"  # splash: 128 lanes
    assert attention.resolve("auto", jnp.bfloat16, 128, platform="cpu") == "einsum"
    with pytest.raises(ValueError, match="'flash'.*auto, einsum, cudnn, splash"):
        attention.resolve("flash", jnp.bfloat16, 128)
    with pytest.raises(ValueError, match="cudnn.*float32"):
        attention.resolve("cudnn", jnp.float32, 128, platform="gpu")
