"""Attention kernels, one per platform, behind one function per use.

Full-sequence causal attention (`causal_attention`) is what the teacher-forced logprobs, the
update's forward/backward and the sampler's prefill run. Which kernel runs it:

| implementation | where                  | kernel                                                        |
|----------------|------------------------|---------------------------------------------------------------|
| "einsum"       | CPU; reference         | two einsums and a float32 softmax over a materialised [T, S]  |
| "cudnn"        | GPU, bf16/fp16 compute | cuDNN flash attention (`jax.nn.dot_product_attention`)        |
| "splash"       | TPU, head_dim % 128 = 0| Pallas splash attention (`jax.experimental.pallas.ops.tpu`)   |
| "auto"         | everywhere (default)   | the fused kernel of the platform when the call fits it, else einsum |

"auto" falls back to einsum where the fused kernel cannot run the call: float32 compute on a GPU
(cuDNN takes only bf16/fp16), a head_dim that is not a multiple of 128 on a TPU (splash's lane
width), any CPU. Naming a fused kernel explicitly where it cannot run is an error.

Masking is the same for every kernel: query t reads key s iff s <= t and key s is a real token
(`mask_BxS[b, s] != 0`); prompts are left-padded, so padding sits before the real tokens. A padding
query (whose output is never used) reads only padding keys, which keeps every softmax row finite
without special cases: cuDNN gets `is_causal` plus a key-padding bias, splash gets segment ids
(padding 0, real 1), einsum a boolean mask. GQA (num_heads a multiple of num_kv_heads) is native in
all three; the fused kernels never repeat keys/values per query head.

`masked_attention` is the einsum reference for any [B, T, S] mask (the "einsum" causal path).

Decode attention (`decode_attention`) is what the sampler's decode step runs: one new query per
row over that row's valid cache slots. The sampler keeps one KV buffer per layer, `[B, K, S, H]`
(rows, kv heads, slots, head dim; `models.decoding.SlotCache`); row b's valid keys are the slots
`[start_B[b], end_B[b])` (its left-padded prompt, then the tokens decoded so far):

| implementation | where               | kernel                                                          |
|----------------|---------------------|-----------------------------------------------------------------|
| "einsum"       | CPU, TPU; reference | masked einsum over all S slots of the layer's buffer, read in place (no copy) |
| "pallas"       | GPU (CPU: interpret)| jax's Pallas/Triton flash-decoding kernel (`pallas.ops.gpu.decode_attention`), reading only the 64-slot blocks that overlap a row's valid range |
| "auto"         | everywhere (default)| "pallas" on GPU, else "einsum"                                  |

The Pallas kernel is vmapped over rows and kv heads on the buffer as it lies. jax's own `gqa`
wrapper takes `[B, S, K, H]` and transposes it to heads-first, a whole-layer copy per step; hence
the heads-first layout and the direct call of its unbatched kernel here. It needs S to be a
multiple of `DECODE_SLOT_ALIGN` (the sampler rounds its cache up). TPU has ragged/paged kernels in
jax (`pallas.ops.tpu.ragged_paged_attention`) but they want a paged `[K, pages, page, H]` layout
of the whole cache; wiring them waits for a TPU to test on, so TPU runs "einsum" today.

Notes on the fused paths:
* cuDNN takes the key-padding mask as a [B, 1, T, S] bias in the compute dtype (it has no
  left-padding mode) and returns its gradient, which nothing uses; the cost is B·T·S elements per
  layer, not B·N·T·S float32 scores. Its custom partitioning shards over batch and heads.
* splash runs per sequence (vmapped over the batch) with the default 128 × 128 blocks; sequences
  are padded to a multiple of 128 (the pad is its own segment). With a mesh in context
  (`jax.set_mesh`), the kernel runs per batch shard under `shard_map`; without one, XLA
  sees one opaque call over the global arrays. Block sizes are untuned: no TPU was available when
  this was written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cfpo_jax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

_SPLASH_BLOCK = 128
DECODE_IMPLEMENTATIONS = ("auto", "einsum", "pallas")
DECODE_SLOT_ALIGN = 128  # the Pallas decode kernel splits the slots into blocks of 128
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve(implementation: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The kernel that runs a call: `implementation` itself, or for "auto" the platform's fused
    kernel when it can run a call in `dtype` with `head_dim`, else "einsum"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    platform = platform or jax.default_backend()
    cudnn_fits = platform == "gpu" and jnp.dtype(dtype) in _CUDNN_DTYPES and head_dim % 8 == 0
    splash_fits = platform == "tpu" and head_dim % 128 == 0
    if implementation == "auto":
        return "cudnn" if cudnn_fits else "splash" if splash_fits else "einsum"
    if implementation == "cudnn" and not cudnn_fits:
        raise ValueError(
            f"attention='cudnn' needs a GPU, bf16/fp16 compute and head_dim % 8 == 0; got platform "
            f"{platform!r}, dtype {jnp.dtype(dtype).name}, head_dim {head_dim} (use 'auto' or 'einsum')"
        )
    if implementation == "splash" and platform not in ("tpu", "cpu"):
        # CPU runs the kernel in Pallas interpret mode (slow; for tests).
        raise ValueError(f"attention='splash' needs a TPU (or CPU interpret mode); got platform {platform!r}")
    return implementation


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT, *, implementation: str = "auto"):
    """Causal self-attention over real tokens: query t reads key s iff s <= t and mask_BxT[b, s].

    q [B, T, N, H], k/v [B, T, K, H] with N a multiple of K, all in the compute dtype; mask [B, T]
    (1 for real tokens). Returns [B, T, N, H] in the compute dtype; softmax statistics in float32.
    Rows of padding queries hold finite values that callers ignore.
    """
    H = q_BxTxNxH.shape[-1]
    kernel = resolve(implementation, q_BxTxNxH.dtype, H)
    if kernel == "cudnn":
        return _cudnn_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT)
    if kernel == "splash":
        return _splash_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT)
    T = q_BxTxNxH.shape[1]
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    # Padding queries read the padding keys before them (themselves at least), as in the fused
    # kernels, so no row is empty.
    key_ok_BxTxT = (mask_BxT[:, None, :] != 0) == (mask_BxT[:, :, None] != 0)
    return masked_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, causal_TxT[None] & key_ok_BxTxT)


def masked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
    """Reference grouped-query attention under any boolean mask [B, T, S]: query head n reads kv
    head n // (N / K). Scores and softmax in float32; a row with no allowed key averages all keys."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    ) * (H**-0.5)
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(B, T, N, H)


# ----------------------------------------------------------------------------- GPU: cuDNN


def _cudnn_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT):
    B, T = mask_BxT.shape
    # cuDNN's backward with a bias needs an even length; a trailing pad column is never read by a
    # real query (causality) and its own row is dropped.
    pad = T % 2
    if pad:
        widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT = map(widen, (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT))
    Tp = T + pad
    key_ok_Bx1xTxS = jnp.broadcast_to((mask_BxT != 0)[:, None, None, :], (B, 1, Tp, Tp))
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=key_ok_Bx1xTxS, is_causal=True, implementation="cudnn"
    )
    return out_BxTxNxH[:, :T]


# ----------------------------------------------------------------------------- TPU: Pallas splash


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    causal = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * num_heads)
    # The kernel holds its block-mask tables as arrays: make them concrete even when first built
    # inside a trace, since the kernel is cached across traces.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(causal, interpret=interpret)


def _splash_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT):
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    B, T, N, H = q_BxTxNxH.shape
    pad = -T % _SPLASH_BLOCK
    widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    # Segment ids: padding 0, real tokens 1, the block padding 2 (reads only itself).
    segment_BxT = jnp.pad((mask_BxT != 0).astype(jnp.int32), ((0, 0), (0, pad)), constant_values=2)
    # splash wants heads first and does not scale the scores.
    q_BxNxTxH = (widen(q_BxTxNxH) * jnp.asarray(H**-0.5, q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
    k_BxKxTxH = widen(k_BxTxKxH).transpose(0, 2, 1, 3)
    v_BxKxTxH = widen(v_BxTxKxH).transpose(0, 2, 1, 3)

    def per_shard(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT):
        kernel = _splash_kernel(q_BxNxTxH.shape[1], T + pad, jax.default_backend() != "tpu")
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s))
        return jax.vmap(one)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT)

    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = tuple(a for a in ("data", "fsdp") if a in (mesh.axis_names or ()))
    if batch_axes:
        spec = jax.sharding.PartitionSpec(batch_axes)
        per_shard = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
    out_BxNxTxH = per_shard(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT)
    return out_BxNxTxH.transpose(0, 2, 1, 3)[:, :T]



# ----------------------------------------------------------------------------- decode


def resolve_decode(implementation: str, platform: str | None = None) -> str:
    """The decode kernel that runs: `implementation`, or for "auto" "pallas" on GPU else "einsum"."""
    if implementation not in DECODE_IMPLEMENTATIONS:
        raise ValueError(
            f"decode attention implementation {implementation!r}; valid: {', '.join(DECODE_IMPLEMENTATIONS)}")
    platform = platform or jax.default_backend()
    if implementation == "auto":
        return "pallas" if platform == "gpu" else "einsum"
    if implementation == "pallas" and platform not in ("gpu", "cpu"):
        raise ValueError(f"decode attention 'pallas' needs a GPU (or CPU interpret mode); got platform {platform!r}")
    return implementation


def decode_attention(q_BxNxH, k_BxKxSxH, v_BxKxSxH, start_B, end_B, *, implementation: str = "auto"):
    """softmax(q·k / sqrt(H)) · v over slots [start_B[b], end_B[b]) of row b, grouped-query
    (query head n reads kv head n // (N / K)), float32 softmax. q [B, N, H]; k/v [B, K, S, H] in
    the cache dtype, read in place. Returns [B, N, H] in q's dtype. Needs end > start per row."""
    if resolve_decode(implementation) == "pallas":
        return _pallas_decode(q_BxNxH, k_BxKxSxH, v_BxKxSxH, start_B, end_B)
    B, N, H = q_BxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    q_BxKxGxH = q_BxNxH.reshape(B, K, N // K, H)
    scores_BxKxGxS = jnp.einsum(
        "bkgh,bksh->bkgs", q_BxKxGxH, k_BxKxSxH.astype(q_BxNxH.dtype), preferred_element_type=jnp.float32
    ) * (H**-0.5)
    slot_S = jnp.arange(S)
    valid_BxS = (slot_S[None] >= start_B[:, None]) & (slot_S[None] < end_B[:, None])
    scores_BxKxGxS = jnp.where(valid_BxS[:, None, None], scores_BxKxGxS, -jnp.inf)
    probs_BxKxGxS = jax.nn.softmax(scores_BxKxGxS, axis=-1).astype(q_BxNxH.dtype)
    out_BxKxGxH = jnp.einsum("bkgs,bksh->bkgh", probs_BxKxGxS, v_BxKxSxH.astype(q_BxNxH.dtype))
    return out_BxKxGxH.reshape(B, N, H)


def _pallas_decode(q_BxNxH, k_BxKxSxH, v_BxKxSxH, start_B, end_B):
    from jax.experimental.pallas.ops.gpu.decode_attention import decode_attn_unbatched

    B, N, H = q_BxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    if S % DECODE_SLOT_ALIGN:
        raise ValueError(f"the Pallas decode kernel needs a slot count divisible by {DECODE_SLOT_ALIGN}; got {S}")
    # One split per 128 slots, run in parallel; a split past a row's end returns at once.
    unbatched = functools.partial(
        decode_attn_unbatched, sm_scale=H**-0.5, block_h=16, block_k=64, k_splits=S // DECODE_SLOT_ALIGN,
        num_warps=None, num_stages=2, grid=None, interpret=jax.default_backend() != "gpu", debug=False,
        return_residuals=False, normalize_output=True)
    start_BxK = jnp.broadcast_to(start_B[:, None], (B, K)).astype(jnp.int32)
    end_BxK = jnp.broadcast_to(end_B[:, None], (B, K)).astype(jnp.int32)
    q_BxKxGxH = q_BxNxH.reshape(B, K, N // K, H)
    out_BxKxGxH = jax.vmap(jax.vmap(unbatched))(
        q_BxKxGxH, k_BxKxSxH.astype(q_BxNxH.dtype), v_BxKxSxH.astype(q_BxNxH.dtype), start_BxK, end_BxK)
    return out_BxKxGxH.reshape(B, N, H)
