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

`masked_attention` is the einsum reference for any [B, T, S] mask; the decode step reads the KV
cache with it.

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

