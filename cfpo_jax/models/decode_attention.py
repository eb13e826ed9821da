"""Decode attention: one new query per row over that row's valid cache slots, read in place.

The sampler keeps one KV buffer per layer, `[B, K, S, H]` (rows, kv heads, slots, head dim);
row b's valid keys are the slots `[start_B[b], end_B[b])` (left-padded prompt, then the tokens
decoded so far). Two implementations, same numbers:

* `"xla"` (CPU, TPU, and GPU when Pallas is unavailable): an einsum over all S slots with the
  invalid ones masked out. It reads the layer's buffer where it lies (no copy), but all S slots.
* `"pallas"` (GPU): jax's Pallas/Triton flash-decoding kernel
  (`jax.experimental.pallas.ops.gpu.decode_attention`), vmapped over rows and kv heads on the
  buffer as it lies, so it reads only the blocks of `block_k` slots that overlap a row's valid
  range and never transposes or copies the cache. (jax's `gqa` wrapper takes `[B, S, K, H]`
  and transposes it, a whole-layer copy per step — hence the `[B, K, S, H]` layout and the
  direct call of the unbatched kernel here.) The tests run it in Pallas' interpreter on CPU
  against `"xla"`.

TPU has ragged/paged kernels in jax (`pallas.ops.tpu.ragged_paged_attention`) but they want a
paged layout `[K, pages, page, H]` of the whole cache; wiring them is left for when a TPU is at
hand to test on, so TPU runs `"xla"` today.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")  # the last: Pallas' interpreter, for tests
SLOT_ALIGN = 128  # S is a multiple of this so the Pallas kernel's blocks tile it exactly


def default_implementation() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def decode_attention(q_BxNxH, k_BxKxSxH, v_BxKxSxH, start_B, end_B, *, implementation=None):
    """softmax(q·k / sqrt(H)) · v over slots [start_B[b], end_B[b]) of row b; grouped-query
    (query head n reads kv head n // (N / K)); float32 softmax. Returns [B, N, H] in q's dtype.
    Every row needs end > start (at least one valid slot)."""
    implementation = implementation or default_implementation()
    if implementation == "xla":
        return _xla(q_BxNxH, k_BxKxSxH, v_BxKxSxH, start_B, end_B)
    if implementation in ("pallas", "pallas_interpret"):
        return _pallas(q_BxNxH, k_BxKxSxH, v_BxKxSxH, start_B, end_B,
                       interpret=implementation == "pallas_interpret")
    raise ValueError(f"decode attention implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")


def _xla(q_BxNxH, k_BxKxSxH, v_BxKxSxH, start_B, end_B):
    B, N, H = q_BxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    q_BxKxGxH = q_BxNxH.reshape(B, K, N // K, H)
    scores_BxKxGxS = jnp.einsum(
        "bkgh,bksh->bkgs", q_BxKxGxH, k_BxKxSxH.astype(q_BxNxH.dtype), preferred_element_type=jnp.float32
    ) * (H**-0.5)
    slots_S = jnp.arange(S)
    valid_BxS = (slots_S[None] >= start_B[:, None]) & (slots_S[None] < end_B[:, None])
    scores_BxKxGxS = jnp.where(valid_BxS[:, None, None], scores_BxKxGxS, -jnp.inf)
    probs_BxKxGxS = jax.nn.softmax(scores_BxKxGxS, axis=-1).astype(q_BxNxH.dtype)
    out_BxKxGxH = jnp.einsum("bkgs,bksh->bkgh", probs_BxKxGxS, v_BxKxSxH.astype(q_BxNxH.dtype))
    return out_BxKxGxH.reshape(B, N, H)


def _pallas(q_BxNxH, k_BxKxSxH, v_BxKxSxH, start_B, end_B, *, interpret):
    from jax.experimental.pallas.ops.gpu.decode_attention import decode_attn_unbatched

    B, N, H = q_BxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    if S % SLOT_ALIGN:
        raise ValueError(f"the Pallas decode kernel needs a slot count divisible by {SLOT_ALIGN}; got {S}")
    k_splits = S // SLOT_ALIGN  # one split per 128 slots: splits past a row's end return at once
    unbatched = lambda q, k, v, start, end: decode_attn_unbatched(  # noqa: E731
        q, k, v, start, end, sm_scale=H**-0.5, block_h=16, block_k=min(SLOT_ALIGN, 64),
        k_splits=k_splits, num_warps=None, num_stages=2, grid=None, interpret=interpret,
        debug=False, return_residuals=False, normalize_output=True)
    start_BxK = jnp.broadcast_to(start_B[:, None], (B, K)).astype(jnp.int32)
    end_BxK = jnp.broadcast_to(end_B[:, None], (B, K)).astype(jnp.int32)
    q_BxKxGxH = q_BxNxH.reshape(B, K, N // K, H)
    k_BxKxSxH = k_BxKxSxH.astype(q_BxNxH.dtype)
    v_BxKxSxH = v_BxKxSxH.astype(q_BxNxH.dtype)
    out_BxKxGxH = jax.vmap(jax.vmap(unbatched))(q_BxKxGxH, k_BxKxSxH, v_BxKxSxH, start_BxK, end_BxK)
    return out_BxKxGxH.reshape(B, N, H)
