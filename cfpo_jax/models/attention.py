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

Masking is the same for every kernel: the mask is a segment id per token (0 padding; a row of
one sequence has 1 on its real tokens, a packed row 1, 2, ... per sequence, `cfpo_jax.packing`),
and query t reads key s iff s <= t and both are in the same segment. So attention never crosses
a sequence of a packed row, and a padding query (whose output is never used) reads only padding
keys, which keeps every softmax row finite without special cases: cuDNN gets `is_causal` plus the
block-diagonal same-segment mask, splash the segment ids natively, einsum a boolean mask. GQA (num_heads a multiple of num_kv_heads) is native in
all three; the fused kernels never repeat keys/values per query head.

`masked_attention` is the einsum reference for any [B, T, S] mask (the "einsum" causal path).

Decode attention (`decode_attention`) is what the sampler's decode step runs: one new query per
row over that row's valid cache slots. The sampler keeps one KV buffer per layer, `[B, K, S, H]`
(rows, kv heads, slots, head dim; `models.decoding.SlotCache`), each row left-aligned in it: row
b's valid keys are the slots `[0, length_B[b])` (its prompt, then the tokens decoded so far):

| implementation | where                       | kernel                                                  |
|----------------|-----------------------------|---------------------------------------------------------|
| "einsum"       | TPU/GPU fallback; reference | masked einsum over all S slots of the layer's buffer, read in place (no copy) |
| "reduce"       | CPU fallback                | the same sums as products and reductions over head_dim and slots, not dots |
| "native"       | CPU                         | a C++ kernel through `jax.ffi` (`cpu_kernel`, built on first use): the "reduce" sums over only the slots below a row's length |
| "pallas"       | GPU (CPU: interpret)        | jax's Pallas/Triton flash-decoding kernel (`pallas.ops.gpu.decode_attention`), reading only the 64-slot blocks below a row's length |
| "paged"        | TPU (CPU: TPU interpret mode) | jax's Pallas TPU paged-attention kernel (`pallas.ops.tpu.paged_attention`), DMA-ing only the blocks of pages that start below a row's length |
| "auto"         | everywhere (default)        | "pallas" on GPU; "paged" on TPU for a bfloat16 cache with head_dim % 128 = 0; "native" on CPU for float32/bfloat16 ("reduce" where it does not build: no C++ compiler); else "einsum" |

"reduce" exists for XLA:CPU, which lowers the einsum to B·K matmuls of [N/K, head_dim] × [head_dim,
S], too small to run near either roofline: 14 ms a layer at 256 rows and 144 slots of SmolLM2,
against 6–8 ms for the products-and-sums form (which still reads the buffer at ~7–9 GB/s where a
plain sum reads 21–28 GB/s; benchmarks/README.md, "Decode attention as products and sums on
CPU"). On a TPU or GPU the einsum's matmuls are the better fallback.

"native" exists because no XLA:CPU formulation reads only a row's valid slots without a copy of the
slice (tried: static prefixes, per-block buffers; benchmarks/README.md) and jax has no Pallas
backend for CPU. It computes the "reduce" kernel's sums in the same precisions (float32 products,
sums and softmax; the probabilities and the output rounded to q's dtype), in another summation
order and with glibc's vector expf, per (row, kv head) on XLA's intra-op threads: at SmolLM2's
shapes (32 rows, 80 of 143 slots valid) 30 layers take 7.6–8.4 ms against 18.5–23.9 ms for
"reduce", and at 256 rows it reads the valid keys and values at 21 GB/s of the box's ~33
(benchmarks/README.md, "A C++ decode attention for XLA:CPU"). It takes float32 or bfloat16 queries
and caches ("auto" picks it for those dtypes).

Both Pallas kernels need S to be a multiple of `DECODE_SLOT_ALIGN` = 128 (the sampler rounds its
cache up) and read the buffer as it lies:
* "pallas" is vmapped over rows and kv heads. jax's own `gqa` wrapper takes `[B, S, K, H]` and
  transposes it to heads-first, a whole-layer copy per step; hence the heads-first layout and the
  direct call of its unbatched kernel here.
* "paged" sees the buffer as B·K kernel sequences of one kv head each (the G = N / K query
  heads of that kv head), each sequence S / 128 consecutive pages of 128 slots (`page_indices` an
  arange). That is a reshape keeping the minor (slot, head_dim) dims: a bitcast, not a copy, in
  the TPU compiler's output (v5e, 2026-12-03), as long as the decode loop's cache keeps the
  buffer's layout (`decoding.decode_step`'s per-(slot, head) write). The kernel reads a row in blocks of up to 4
  pages, double-buffered by DMA, only the blocks that start below the row's length. It has no
  start offset, which is why rows sit left-aligned in the cache. It reads keys/values as bfloat16
  (its own cast), hence "auto" only for a bfloat16 cache; head_dim % 128 = 0 because jax tests it upstream for 128 and 256 only;
  megacore off (upstream skips its kernel test for data races in the megacore modes; one core
  runs race-free under the interpreter's detector, tests/unit/models/test_decode_attention.py). jax's
  `ragged_paged_attention` was not used: it wants keys and values interleaved in one
  `[pages, page, 2K, H]` buffer, a layout the GPU kernel could not read without a copy per step. Page and block sizes are untuned and the kernel's speed on a
  TPU is unmeasured: no TPU was available when this was written.

Notes on the fused paths:
* cuDNN takes the same-segment mask as a [B, 1, T, S] boolean (it has no left-padding or
  segment mode in `jax.nn.dot_product_attention`); the cost is B·T·S elements per layer, not
  B·N·T·S float32 scores. It runs per shard like the Pallas kernels: its own custom
  partitioning rejects the trainer's FSDP update ("Query, key and value should have same
  sharding", seen compiling for H100s).
* splash runs per sequence (vmapped over the batch) with the default 128 × 128 blocks; sequences
  are padded to a multiple of 128 (the pad is its own segment). Block sizes are untuned: no TPU
  was available when this was written.

Platform and mesh: which kernel "auto" picks, and whether a Pallas kernel runs compiled or in
interpret mode, follow the platform of the devices the program is compiled for — the mesh in
context (`jax.set_mesh`, which every caller that owns a mesh puts around its jitted calls:
trainer, sampler, evaluation, reward model) — and only without a mesh the host's default backend
(`target_platform()`). So the same code compiles for a TPU slice or H100s from a CPU host
(compile-only devices, `cfpo_jax.aot`). With a mesh in context every fused kernel (splash,
paged, the GPU decode kernel, cuDNN) runs per shard under `shard_map` — rows over ('data',
'fsdp') and heads over 'tensor' where they divide — because XLA cannot partition a Mosaic or
Triton call itself ("Mosaic kernels cannot be automatically partitioned").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cfpo_jax.models import cpu_kernel
from cfpo_jax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

_SPLASH_BLOCK = 128
DECODE_IMPLEMENTATIONS = ("auto", "einsum", "reduce", "native", "pallas", "paged")
DECODE_SLOT_ALIGN = 128  # the Pallas decode kernels' unit of slots: a split (GPU), a page (TPU)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_tpu_interpret_params = None  # "paged" off TPU: TPU interpret mode's settings (None: defaults; a test adds race detection)
_BATCH_AXES = ("data", "fsdp", "expert")  # cfpo_jax.sharding.BATCH_AXES (models import no sharding code)


def target_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") of the program being traced: that of the mesh in
    context (`jax.set_mesh`), else the host's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _per_shard(fn, num_rows: int, num_heads: tuple[int, ...], head_axes: tuple[int | None, ...]):
    """`fn` under `shard_map` over the mesh in context, if any (else `fn` itself). Every argument
    and the result have rows first; argument i has its heads on axis `head_axes[i]` (None: no
    heads), the result on the first argument's. Rows split over the ('data', 'fsdp') axes when
    they divide `num_rows`; heads over 'tensor' when it divides every count in `num_heads`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    names = mesh.axis_names
    rows = tuple(a for a in _BATCH_AXES if a in names)
    if num_rows % math.prod(mesh.shape[a] for a in rows):
        rows = ()
    heads = "tensor" if "tensor" in names and all(n % mesh.shape["tensor"] == 0 for n in num_heads) else None

    def spec(head_axis):
        entries = [rows or None] + [None] * (head_axis or 0)
        if head_axis is not None:
            entries[head_axis] = heads
        return P(*entries)

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(spec, head_axes)), out_specs=spec(head_axes[0]),
                         check_vma=False)


def resolve(implementation: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The kernel that runs a call: `implementation` itself, or for "auto" the platform's fused
    kernel when it can run a call in `dtype` with `head_dim`, else "einsum"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    platform = platform or target_platform()
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


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, *, implementation: str = "auto"):
    """Causal self-attention within segments: query t reads key s iff s <= t and
    segment_BxT[b, s] == segment_BxT[b, t].

    q [B, T, N, H], k/v [B, T, K, H] with N a multiple of K, all in the compute dtype; segment ids
    [B, T] int (0 padding; a plain mask, 1 for real tokens, is the one-sequence case). Returns
    [B, T, N, H] in the compute dtype; softmax statistics in float32. Rows of padding queries hold
    finite values that callers ignore.
    """
    H = q_BxTxNxH.shape[-1]
    kernel = resolve(implementation, q_BxTxNxH.dtype, H)
    if kernel == "cudnn":
        B, K = segment_BxT.shape[0], k_BxTxKxH.shape[2]
        return _per_shard(_cudnn_causal, B, (q_BxTxNxH.shape[2], K), (2, 2, 2, None))(
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT)
    if kernel == "splash":
        return _splash_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT)
    T = q_BxTxNxH.shape[1]
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    # Padding queries read the padding keys before them (themselves at least), as in the fused
    # kernels, so no row is empty.
    return masked_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, causal_TxT[None] & same_segment(segment_BxT))


def same_segment(segment_BxT):
    """[B, T, S] boolean: query t and key s are in the same segment (padding is segment 0)."""
    return segment_BxT[:, :, None] == segment_BxT[:, None, :]


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


def _cudnn_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT):
    T = segment_BxT.shape[1]
    # cuDNN's backward with a bias needs an even length; a trailing pad column is never read by a
    # real query (causality) and its own row is dropped.
    pad = T % 2
    if pad:
        widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT = map(widen, (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT))
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=same_segment(segment_BxT)[:, None], is_causal=True,
        implementation="cudnn"
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


def _splash_causal(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT):
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    B, T, N, H = q_BxTxNxH.shape
    pad = -T % _SPLASH_BLOCK
    widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    # The block padding is a segment of its own (reads only itself): T + 1 exceeds any id, as a
    # row holds at most T sequences.
    segment_BxT = jnp.pad(segment_BxT.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=T + 1)
    # splash wants heads first and does not scale the scores.
    q_BxNxTxH = (widen(q_BxTxNxH) * jnp.asarray(H**-0.5, q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
    k_BxKxTxH = widen(k_BxTxKxH).transpose(0, 2, 1, 3)
    v_BxKxTxH = widen(v_BxTxKxH).transpose(0, 2, 1, 3)

    interpret = target_platform() != "tpu"

    def per_shard(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT):
        kernel = _splash_kernel(q_BxNxTxH.shape[1], T + pad, interpret)
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s))
        return jax.vmap(one)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT)

    K = k_BxTxKxH.shape[2]
    out_BxNxTxH = _per_shard(per_shard, B, (N, K), (1, 1, 1, None))(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT)
    return out_BxNxTxH.transpose(0, 2, 1, 3)[:, :T]


# ----------------------------------------------------------------------------- decode


def resolve_decode(implementation: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The decode kernel that runs: `implementation`, or for "auto" "pallas" on GPU, "paged" on a
    TPU for a bfloat16 cache with head_dim a multiple of 128, "native" on CPU for float32 or
    bfloat16 where it builds (else "reduce"), else "einsum"."""
    if implementation not in DECODE_IMPLEMENTATIONS:
        raise ValueError(
            f"decode attention implementation {implementation!r}; valid: {', '.join(DECODE_IMPLEMENTATIONS)}")
    platform = platform or target_platform()
    if implementation == "auto":
        if platform == "cpu":
            native_fits = jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16) and cpu_kernel.available()[0]
            return "native" if native_fits else "reduce"
        paged_fits = platform == "tpu" and jnp.dtype(dtype) == jnp.bfloat16 and head_dim % 128 == 0
        return "pallas" if platform == "gpu" else "paged" if paged_fits else "einsum"
    if implementation == "pallas" and platform not in ("gpu", "cpu"):
        raise ValueError(f"decode attention 'pallas' needs a GPU (or CPU interpret mode); got platform {platform!r}")
    if implementation == "native" and platform != "cpu":
        raise ValueError(f"decode attention 'native' is a CPU kernel; got platform {platform!r}")
    if implementation == "paged" and platform not in ("tpu", "cpu"):
        raise ValueError(f"decode attention 'paged' needs a TPU (or CPU interpret mode); got platform {platform!r}")
    return implementation


def decode_attention(q_BxNxH, k_BxKxSxH, v_BxKxSxH, length_B, *, implementation: str = "auto"):
    """softmax(q·k / sqrt(H)) · v over slots [0, length_B[b]) of row b, grouped-query (query head
    n reads kv head n // (N / K)), float32 softmax. q [B, N, H]; k/v [B, K, S, H] in the cache
    dtype, read in place. Returns [B, N, H] in q's dtype. Needs length >= 1 per row. The Pallas
    kernels run per shard of the mesh in context (see the module doc)."""
    kernel = resolve_decode(implementation, k_BxKxSxH.dtype, q_BxNxH.shape[-1])
    if kernel in ("pallas", "paged", "native"):
        if kernel != "native":
            _check_slot_align(kernel, k_BxKxSxH.shape[2])
        per_shard = {"pallas": _pallas_decode, "paged": _paged_decode, "native": cpu_kernel.decode_attention}[kernel]
        B, N, _ = q_BxNxH.shape
        K = k_BxKxSxH.shape[1]
        return _per_shard(per_shard, B, (N, K), (1, 1, 1, None))(q_BxNxH, k_BxKxSxH, v_BxKxSxH, length_B)
    B, N, H = q_BxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    q_BxKxGxH = q_BxNxH.reshape(B, K, N // K, H)
    k_BxKxSxH, v_BxKxSxH = k_BxKxSxH.astype(q_BxNxH.dtype), v_BxKxSxH.astype(q_BxNxH.dtype)
    if kernel == "reduce":
        scores_BxKxGxS = jnp.sum(q_BxKxGxH[:, :, :, None].astype(jnp.float32) * k_BxKxSxH[:, :, None], axis=-1)
    else:
        scores_BxKxGxS = jnp.einsum("bkgh,bksh->bkgs", q_BxKxGxH, k_BxKxSxH, preferred_element_type=jnp.float32)
    valid_BxS = jnp.arange(S)[None] < length_B[:, None]
    scores_BxKxGxS = jnp.where(valid_BxS[:, None, None], scores_BxKxGxS * (H**-0.5), -jnp.inf)
    probs_BxKxGxS = jax.nn.softmax(scores_BxKxGxS, axis=-1).astype(q_BxNxH.dtype)
    if kernel == "reduce":
        out_BxKxGxH = jnp.sum(probs_BxKxGxS[..., None].astype(jnp.float32) * v_BxKxSxH[:, :, None], axis=3)
        out_BxKxGxH = out_BxKxGxH.astype(q_BxNxH.dtype)
    else:
        out_BxKxGxH = jnp.einsum("bkgs,bksh->bkgh", probs_BxKxGxS, v_BxKxSxH)
    return out_BxKxGxH.reshape(B, N, H)


def _check_slot_align(kernel: str, S: int):
    if S % DECODE_SLOT_ALIGN:
        raise ValueError(f"the {kernel!r} decode kernel needs a slot count divisible by {DECODE_SLOT_ALIGN}; got {S}")


def _pallas_decode(q_BxNxH, k_BxKxSxH, v_BxKxSxH, length_B):
    from jax.experimental.pallas.ops.gpu.decode_attention import decode_attn_unbatched

    B, N, H = q_BxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    # One split per 128 slots, run in parallel; a split past a row's end returns at once.
    unbatched = functools.partial(
        decode_attn_unbatched, sm_scale=H**-0.5, block_h=16, block_k=64, k_splits=S // DECODE_SLOT_ALIGN,
        num_warps=None, num_stages=2, grid=None, interpret=target_platform() != "gpu", debug=False,
        return_residuals=False, normalize_output=True)
    start_BxK = jnp.zeros((B, K), jnp.int32)
    end_BxK = jnp.broadcast_to(length_B[:, None], (B, K)).astype(jnp.int32)
    q_BxKxGxH = q_BxNxH.reshape(B, K, N // K, H)
    out_BxKxGxH = jax.vmap(jax.vmap(unbatched))(
        q_BxKxGxH, k_BxKxSxH.astype(q_BxNxH.dtype), v_BxKxSxH.astype(q_BxNxH.dtype), start_BxK, end_BxK)
    return out_BxKxGxH.reshape(B, N, H)


def _paged_decode(q_BxNxH, k_BxKxSxH, v_BxKxSxH, length_B):
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    B, N, H = q_BxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    pages = S // DECODE_SLOT_ALIGN
    # R = B·K kernel sequences, one per (row, kv head), each with that kv head's G query
    # heads and Q = S / C consecutive pages of C = 128 slots: the buffer itself, as
    # [1 kv head, R·Q pages, C, H] (a reshape of the leading dims).
    k_1xPxCxH = k_BxKxSxH.reshape(1, B * K * pages, DECODE_SLOT_ALIGN, H)
    v_1xPxCxH = v_BxKxSxH.reshape(1, B * K * pages, DECODE_SLOT_ALIGN, H)
    page_indices_RxQ = jnp.arange(B * K * pages, dtype=jnp.int32).reshape(B * K, pages)
    q_RxGxH = (q_BxNxH * jnp.asarray(H**-0.5, q_BxNxH.dtype)).reshape(B * K, N // K, H)  # unscaled kernel
    length_R = jnp.repeat(length_B.astype(jnp.int32), K)
    kernel = lambda: paged_attention(
        q_RxGxH, k_1xPxCxH, v_1xPxCxH, length_R, page_indices_RxQ,
        pages_per_compute_block=next(n for n in (4, 2, 1) if pages % n == 0))
    if target_platform() == "tpu":
        return kernel().reshape(B, N, H)
    # Read when the kernel is traced: elsewhere (CPU tests) jax's TPU interpreter runs it.
    with pltpu.force_tpu_interpret_mode(_tpu_interpret_params or pltpu.InterpretParams()):
        return kernel().reshape(B, N, H)
