"""cfpo_jax.models.attention.decode_attention against a numpy formula: each row attends over
exactly its slots [start, end), grouped-query heads; on CPU the Pallas GPU kernel runs in Pallas'
interpreter."""

import jax.numpy as jnp
import numpy as np
import pytest

from cfpo_jax.models.attention import decode_attention


def numpy_decode_attention(q, k, v, start, end):
    B, N, H = q.shape
    K = k.shape[1]
    out = np.zeros_like(q, dtype=np.float64)
    for b in range(B):
        for n in range(N):
            keys, values = k[b, n // (N // K), start[b]:end[b]], v[b, n // (N // K), start[b]:end[b]]
            scores = keys.astype(np.float64) @ q[b, n] / np.sqrt(H)
            probs = np.exp(scores - scores.max())
            out[b, n] = probs / probs.sum() @ values
    return out


@pytest.mark.parametrize("implementation", ["einsum", "pallas"])
def test_each_row_reads_exactly_its_valid_slots(implementation):
    rng = np.random.default_rng(0)
    B, N, K, S, H = 4, 6, 2, 256, 16
    q = rng.normal(size=(B, N, H)).astype(np.float32)
    k = rng.normal(size=(B, K, S, H)).astype(np.float32)
    v = rng.normal(size=(B, K, S, H)).astype(np.float32)
    start, end = np.array([0, 5, 100, 255]), np.array([1, 130, 256, 256])
    expected = numpy_decode_attention(q, k, v, start, end)
    # Garbage outside each row's range (NaN-free but huge) must not leak in.
    for b in range(B):
        k[b, :, : start[b]] = v[b, :, : start[b]] = 1e4
        k[b, :, end[b]:] = v[b, :, end[b]:] = 1e4
    got = decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(start),
                           jnp.asarray(end), implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)


def test_unknown_implementation_is_named():
    x = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="'flash'.*auto, einsum, pallas"):
        decode_attention(x, jnp.zeros((1, 1, 128, 4)), jnp.zeros((1, 1, 128, 4)), jnp.zeros(1, int),
                         jnp.ones(1, int), implementation="flash")
