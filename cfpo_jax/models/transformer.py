"""The decoder: GQA attention with RoPE, SwiGLU MLP, RMSNorm; layers stacked and run with a scan.

Families differ only by `ModelConfig` flags (q/k/v bias, q/k norm, explicit head_dim, tied
embeddings, RoPE scaling), never by copies of this code. Parameter names are the parameter *kinds*
that `cfpo_jax.sharding` keys its one rule table on: `embedding [V, D]`, `lm_head [D, V]`,
`q_kernel [D, N, H]`, `k_kernel`/`v_kernel [D, K, H]`, `o_kernel [N, H, D]`, `q_bias [N, H]`,
`k_bias`/`v_bias [K, H]`, `gate_kernel`/`up_kernel [D, F]`, `down_kernel [F, D]` and `scale` for
every RMSNorm, and for a reward model (`config.num_labels > 0`) `score [D, num_labels]` in place of
the unembedding. Everything under `blocks` carries a leading layer axis [L, ...]. A mixture of
experts (`config.num_experts` > 0, Qwen3-MoE) has `cfpo_jax.models.moe.MoE` as every layer's `mlp`
(`router_kernel`, `expert_*_kernel`); `hidden_with_moe` runs it with routing replay and returns the
routing and load-balancing statistics (`moe.MoEStats`), which the dense path never computes.

Low-rank adapters (`config.lora_rank` > 0, see `cfpo_jax.lora`) are `nnx.LoRAParam`s beside the
projection they adapt, `<target>_lora_a [*in, R]` and `<target>_lora_b [R, *out]` (e.g.
`q_lora_a [D, R]`, `q_lora_b [R, N, H]`, `o_lora_a [N, H, R]`), stacked like every block parameter,
so the scan is unchanged. They are float32 whatever the base dtype and add scale·(x·A)·B to the
projection's output, computed on the fly in the compute dtype.

The layer loop is a `jax.lax.scan` over the stacked block state (`nnx.merge` of one layer's slice
inside the body), so the compiled program holds one layer however deep the model is;
`config.unroll_layers` unrolls it (faster for a few layers on CPU, compile time grows with depth).

With `config.remat` the body is rematerialised in the backward pass; `config.remat_policy` says
what each layer keeps (`REMAT_POLICY`):
* "full": only the layer's input. Least memory (one [B, T, D] per layer), the backward pass reruns
  the whole layer forward (≈ +33% FLOPs of a training step). For long sequences or large
  micro-batches, when anything more does not fit.
* "dots_with_no_batch_dims": also the outputs of the weight matmuls (q/k/v/o projections, MLP
  gate/up/down: ≈ (2D + (N + 2K)·H + 2F) values per token per layer); only norms, RoPE,
  activations and attention are recomputed, so the extra FLOPs are small. The usual choice when
  it fits (MaxText's "minimal").
* "dots": every matmul output, including the einsum path's [T, S] attention scores: more
  memory than the above for almost no compute saved; there for comparison and for short
  sequences. (A fused attention kernel is not a dot: its output is recomputed either way.)

Attention (`hidden`, `__call__`) runs `attention.causal_attention` over the full sequence with
the kernel chosen by `config.attention` (fused on GPU/TPU). The sampler runs these same blocks
with its own KV cache and decode attention (`cfpo_jax.models.decoding`).

Numerics follow transformers: RMSNorm and softmax in float32, RoPE angles in float32, matmuls in
the compute dtype with float32 accumulation (`dense`), the logits kept in float32. A left-padding
query reads only the padding keys before it, which keeps it finite; its output is never used.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cfpo_jax.models import attention, matmul, moe
from cfpo_jax.models.config import ModelConfig

_INIT = nnx.initializers.normal(stddev=0.02)
LORA_DTYPE = jnp.float32


def lora_a_init(key, shape):
    """An adapter's A [*in, R]: uniform in ±1/sqrt(fan_in), PEFT's default (kaiming-uniform with
    a = √5). B starts at zero, so a freshly adapted model computes exactly what its base does."""
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, LORA_DTYPE, -bound, bound)


def _add_adapter(module, target, in_shape, out_shape, config, rngs):
    if config.adapted(target):
        rank = config.lora_rank
        setattr(module, f"{target}_lora_a", nnx.LoRAParam(lora_a_init(rngs.params(), (*in_shape, rank))))
        setattr(module, f"{target}_lora_b", nnx.LoRAParam(jnp.zeros((rank, *out_shape), LORA_DTYPE)))


def dense(x, kernel, *, num_in: int = 1, preferred_element_type=None):
    """x [..., *in] · kernel [*in, *out] → [..., *out] (`num_in` = len(in)), as one 2-D matmul
    over the flattened leading axes.

    Why flattened: the weight gradient contracts over every leading (batch, time) axis. Given as
    two axes, XLA's CPU backend first copies the cotangent into a transposed 3-D layout, which made
    an MLP's forward + backward 2.3× slower at [256, 144] tokens (benchmarks/README.md, vs_tunix);
    as rows, it is one matmul. The reshapes merge contiguous axes and cost nothing.

    A bfloat16 (or other sub-float32) matmul on CPU asks for float32 accumulation and rounds the
    output to the compute dtype: without it XLA:CPU converts both operands to float32 and runs a
    float32 matmul, with it the bfloat16 kernel runs (AVX-512 BF16 where the CPU has it):
    SmolLM2's bfloat16 decode at 32 rows 1.4× faster (benchmarks/README.md). The sums are
    float32 either way. TPUs and GPUs accumulate bfloat16 in float32 already; their programs are
    left as they were.

    Traced inside `matmul.kernel("native")` (the sampler on CPU), a float32 or bfloat16 call
    without `preferred_element_type` runs the C++ kernel instead (`cfpo_jax.models.matmul`): float32
    sums (bfloat16: rounded once), no gradient.
    """
    lead, in_shape, out_shape = x.shape[: x.ndim - num_in], kernel.shape[:num_in], kernel.shape[num_in:]
    rows_RxI = x.reshape(-1, math.prod(in_shape))
    if preferred_element_type is None and matmul.native_applies(x.dtype, kernel.dtype):
        return matmul.native(rows_RxI, kernel.reshape(math.prod(in_shape), -1)).reshape(*lead, *out_shape)
    accumulate = preferred_element_type or _cpu_accumulation(x.dtype)
    out_RxO = jnp.matmul(rows_RxI, kernel.reshape(math.prod(in_shape), -1), preferred_element_type=accumulate)
    if preferred_element_type is None:
        out_RxO = out_RxO.astype(jnp.result_type(x.dtype, kernel.dtype))
    return out_RxO.reshape(*lead, *out_shape)


def _cpu_accumulation(dtype):
    """float32 for a sub-float32 matmul traced for the CPU (see `dense`), else None."""
    if jnp.dtype(dtype).itemsize < 4 and attention.target_platform() == "cpu":
        return jnp.float32
    return None


def _adapt(module, target, x, out):
    """`out` + scale·(x·A)·B when `target` carries an adapter; x [..., *in], out [..., *out]."""
    if not module.config.adapted(target):
        return out
    lora_a = getattr(module, f"{target}_lora_a")[...].astype(x.dtype)
    lora_b = getattr(module, f"{target}_lora_b")[...].astype(x.dtype)
    xa = dense(x, lora_a, num_in=lora_a.ndim - 1) * module.config.lora_scale
    return out + dense(xa, lora_b)


REMAT_POLICY = {
    "full": None,  # jax.checkpoint saves nothing but the inputs
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}


def default_positions(mask_BxT):
    """Position ids of a left-padded batch: 0 at the first real token, 0 on padding."""
    return jnp.maximum(jnp.cumsum((mask_BxT != 0).astype(jnp.int32), axis=-1) - 1, 0)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies [H/2] (float32), with Llama-3 or linear scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_angles(config: ModelConfig, positions_BxT):
    """(sin, cos) [B, T, H] float32 in transformers' half-split layout."""
    freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    angles_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    return jnp.sin(angles_BxTxH), jnp.cos(angles_BxTxH)


def apply_rope(x_BxTxNxH, sin_BxTxH, cos_BxTxH):
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    sin, cos = sin_BxTxH[:, :, None, :], cos_BxTxH[:, :, None, :]
    return (x_BxTxNxH * cos.astype(x_BxTxNxH.dtype) + rotated * sin.astype(x_BxTxNxH.dtype))


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, config: ModelConfig):
        self.eps = config.rms_norm_eps
        self.dtype = jnp.dtype(config.dtype)
        self.scale = nnx.Param(jnp.ones((dim,), config.param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        pdt = config.param_dtype
        self.config = config
        self.q_kernel = nnx.Param(_INIT(rngs.params(), (D, N, H), pdt))
        self.k_kernel = nnx.Param(_INIT(rngs.params(), (D, K, H), pdt))
        self.v_kernel = nnx.Param(_INIT(rngs.params(), (D, K, H), pdt))
        self.o_kernel = nnx.Param(_INIT(rngs.params(), (N, H, D), pdt))
        for target, in_shape, out_shape in (
            ("q", (D,), (N, H)), ("k", (D,), (K, H)), ("v", (D,), (K, H)), ("o", (N, H), (D,))
        ):
            _add_adapter(self, target, in_shape, out_shape, config, rngs)
        if config.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((N, H), pdt))
            self.k_bias = nnx.Param(jnp.zeros((K, H), pdt))
            self.v_bias = nnx.Param(jnp.zeros((K, H), pdt))
        if config.qk_norm:
            self.q_norm = RMSNorm(H, config)
            self.k_norm = RMSNorm(H, config)

    def _project(self, x_BxTxD, name):
        dtype = x_BxTxD.dtype
        out = dense(x_BxTxD, getattr(self, f"{name}_kernel")[...].astype(dtype))
        out = _adapt(self, name, x_BxTxD, out)
        if self.config.qkv_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(dtype)
        return out

    def qkv(self, x_BxTxD, sin_BxTxH, cos_BxTxH):
        """Queries [B, T, N, H], keys and values [B, T, K, H], with q/k norm and RoPE applied."""
        q_BxTxNxH = self._project(x_BxTxD, "q")
        k_BxTxKxH = self._project(x_BxTxD, "k")
        v_BxTxKxH = self._project(x_BxTxD, "v")
        if self.config.qk_norm:
            q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
        return apply_rope(q_BxTxNxH, sin_BxTxH, cos_BxTxH), apply_rope(k_BxTxKxH, sin_BxTxH, cos_BxTxH), v_BxTxKxH

    def out(self, out_BxTxNxH):
        """The output projection [B, T, N, H] -> [B, T, D] (with its adapter, if any)."""
        out_BxTxD = dense(out_BxTxNxH, self.o_kernel[...].astype(out_BxTxNxH.dtype), num_in=2)
        return _adapt(self, "o", out_BxTxNxH, out_BxTxD)

    def __call__(self, x_BxTxD, sin_BxTxH, cos_BxTxH, mask_BxT):
        """Causal self-attention over this call's tokens within segments (`mask_BxT`: segment
        ids, 0 padding; see `attention.causal_attention`): [B, T, D]."""
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self.qkv(x_BxTxD, sin_BxTxH, cos_BxTxH)
        out_BxTxNxH = attention.causal_attention(
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxT, implementation=self.config.attention
        )
        return self.out(out_BxTxNxH)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, F, pdt = config.hidden_size, config.intermediate_size, config.param_dtype
        self.config = config
        self.gate_kernel = nnx.Param(_INIT(rngs.params(), (D, F), pdt))
        self.up_kernel = nnx.Param(_INIT(rngs.params(), (D, F), pdt))
        self.down_kernel = nnx.Param(_INIT(rngs.params(), (F, D), pdt))
        for target, in_shape, out_shape in (("gate", (D,), (F,)), ("up", (D,), (F,)), ("down", (F,), (D,))):
            _add_adapter(self, target, in_shape, out_shape, config, rngs)

    def __call__(self, x_BxTxD):
        dtype = x_BxTxD.dtype
        gate_BxTxF = _adapt(self, "gate", x_BxTxD, dense(x_BxTxD, self.gate_kernel[...].astype(dtype)))
        up_BxTxF = _adapt(self, "up", x_BxTxD, dense(x_BxTxD, self.up_kernel[...].astype(dtype)))
        hidden_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
        return _adapt(self, "down", hidden_BxTxF, dense(hidden_BxTxF, self.down_kernel[...].astype(dtype)))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden_size, config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config)
        self.mlp = moe.MoE(config, rngs=rngs) if config.num_experts else MLP(config, rngs=rngs)

    def __call__(self, x_BxTxD, sin_BxTxH, cos_BxTxH, mask_BxT):
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), sin_BxTxH, cos_BxTxH, mask_BxT)
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))

    def moe_call(self, x_BxTxD, sin_BxTxH, cos_BxTxH, mask_BxT, replay_BxTxK=None):
        """A MoE layer: (output [B, T, D], own top-k experts [B, T, k], `moe.balance_sums`)."""
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), sin_BxTxH, cos_BxTxH, mask_BxT)
        y_BxTxD, own_BxTxK, probs_BxTxE = self.mlp.forward(self.mlp_norm(x_BxTxD), replay_BxTxK)
        return x_BxTxD + y_BxTxD, own_BxTxK, moe.balance_sums(own_BxTxK, probs_BxTxE, mask_BxT != 0)


# ----------------------------------------------------------------------------- the model


class Transformer(nnx.Module):
    """Decoder-only LM. Token ids are int32 [B, T]; masks are 1 for real tokens, 0 for padding."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        D, V, pdt = config.hidden_size, config.vocab_size, config.param_dtype
        self.embedding = nnx.Param(_INIT(rngs.params(), (V, D), pdt))
        if config.num_labels:
            self.score = nnx.Param(_INIT(rngs.params(), (D, config.num_labels), pdt))
        elif not config.tie_embeddings:
            self.lm_head = nnx.Param(_INIT(rngs.params(), (D, V), pdt))

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def stacked_blocks(rngs):
            return Block(config, rngs=rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(D, config)

    def _run_blocks(self, x_BxTxD, positions_BxT, mask_BxT, replay_LxBxTxK=None):
        """Final-norm hidden states, and for a MoE model the scanned per-layer routing outputs."""
        sin_BxTxH, cos_BxTxH = rope_angles(self.config, positions_BxT)
        graphdef, state = nnx.split(self.blocks)

        def body(x_BxTxD, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x_BxTxD, sin_BxTxH, cos_BxTxH, mask_BxT), None

        def moe_body(x_BxTxD, layer):
            layer_state, replay_BxTxK = layer
            block = nnx.merge(graphdef, layer_state)
            x_BxTxD, own_BxTxK, sums = block.moe_call(x_BxTxD, sin_BxTxH, cos_BxTxH, mask_BxT, replay_BxTxK)
            return x_BxTxD, (own_BxTxK, sums)

        xs = state
        if self.config.num_experts:
            body, xs = moe_body, (state, replay_LxBxTxK)
        if self.config.remat:
            body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICY[self.config.remat_policy])
        unroll = self.config.num_layers if self.config.unroll_layers else 1
        x_BxTxD, per_layer = jax.lax.scan(body, x_BxTxD, xs, unroll=unroll)
        return self.final_norm(x_BxTxD), per_layer

    def _embed(self, tokens_BxT):
        return jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.config.dtype)

    def hidden(self, tokens_BxT, *, positions_BxT=None, mask_BxT=None):
        """Final-norm hidden states [B, T, D] (compute dtype), causal over real tokens only.

        `mask_BxT` is 1 on real tokens, or for packed rows (`cfpo_jax.packing`) the segment ids
        (1, 2, ... per sequence, 0 padding) with `positions_BxT` restarting at 0 per sequence:
        attention then stays within a segment and each sequence computes what it does alone."""
        return self._hidden(tokens_BxT, positions_BxT, mask_BxT)[0]

    def hidden_with_moe(self, tokens_BxT, *, positions_BxT=None, mask_BxT=None, routing_BxTxLxK=None):
        """(hidden states as `hidden`, `moe.MoEStats`) of a mixture-of-experts model; with
        `routing_BxTxLxK` (int32 expert ids per token and layer, e.g. the sampler's) the experts run
        are those instead of the router's own top k (routing replay, see `cfpo_jax.models.moe`)."""
        if not self.config.num_experts:
            raise ValueError(f"hidden_with_moe needs a mixture-of-experts model; this "
                             f"{self.config.model_type!r} model has no experts")
        replay_LxBxTxK = None if routing_BxTxLxK is None else jnp.moveaxis(routing_BxTxLxK, 2, 0)
        hidden_BxTxD, (own_LxBxTxK, (counts_LxE, prob_sums_LxE, tokens_L)) = self._hidden(
            tokens_BxT, positions_BxT, mask_BxT, replay_LxBxTxK)
        stats = moe.MoEStats(experts_BxTxLxK=jnp.moveaxis(own_LxBxTxK, 0, 2),
                             aux_loss=moe.aux_loss(counts_LxE, prob_sums_LxE, tokens_L))
        return hidden_BxTxD, stats

    def _hidden(self, tokens_BxT, positions_BxT, mask_BxT, replay_LxBxTxK=None):
        if mask_BxT is None:
            mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
            if positions_BxT is None:
                positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
        if positions_BxT is None:
            positions_BxT = default_positions(mask_BxT)
        return self._run_blocks(self._embed(tokens_BxT), positions_BxT, mask_BxT, replay_LxBxTxK)

    def unembed(self, hidden_BxTxD):
        """Logits [B, T, V] in float32 (float32 accumulation whatever the compute dtype)."""
        if self.config.num_labels:
            raise ValueError("a reward model (sequence classification) has no unembedding; use reward()")
        dtype = hidden_BxTxD.dtype
        if self.config.tie_embeddings:
            kernel_DxV = self.embedding[...].astype(dtype).T
        else:
            kernel_DxV = self.lm_head[...].astype(dtype)
        return dense(hidden_BxTxD, kernel_DxV, preferred_element_type=jnp.float32)

    def target_logits(self, hidden_BxTxD, tokens_BxT):
        """unembed(hidden)[b, t, tokens[b, t]], float32 [B, T], from the tokens' own unembedding
        rows: its gradient is a gather / scatter of D-vectors instead of a [B, T, V] tensor."""
        dtype = hidden_BxTxD.dtype
        if self.config.tie_embeddings:
            rows_BxTxD = jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(dtype)
        else:
            rows_BxTxD = jnp.moveaxis(jnp.take(self.lm_head[...], tokens_BxT, axis=1), 0, -1).astype(dtype)
        return jnp.einsum("btd,btd->bt", hidden_BxTxD, rows_BxTxD, preferred_element_type=jnp.float32)

    def reward(self, tokens_BxT, mask_BxT):
        """Scalar reward per row, float32 [B]: the score head's first label at the last real token.

        The last real token is the rightmost position with mask 1, so padding may sit on either
        side. transformers picks the rightmost token that is not `pad_token_id`; the two agree
        whenever padding is exactly the pad-token positions (a pad id that also occurs as a real
        token, e.g. pad = EOS, is where the mask is the one to trust).
        """
        if not self.config.num_labels:
            raise ValueError("reward() needs a sequence-classification checkpoint (a score head); "
                             "this model is a causal LM")
        T = tokens_BxT.shape[1]
        mask_BxT = mask_BxT.astype(jnp.int32)
        hidden_BxTxD = self.hidden(tokens_BxT, mask_BxT=mask_BxT)
        last_B = jnp.argmax(jnp.arange(T, dtype=jnp.int32) * mask_BxT, axis=-1)
        last_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
        scores_BxL = jnp.einsum(
            "bd,dl->bl", last_BxD, self.score[...].astype(last_BxD.dtype), preferred_element_type=jnp.float32
        )
        return scores_BxL[:, 0]

    def __call__(self, tokens_BxT, *, positions_BxT=None, mask_BxT=None):
        """Logits [B, T, V] float32. Positions default to `default_positions(mask)` (arange without)."""
        return self.unembed(self.hidden(tokens_BxT, positions_BxT=positions_BxT, mask_BxT=mask_BxT))
