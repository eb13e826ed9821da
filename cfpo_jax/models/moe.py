"""The sparse mixture-of-experts MLP of Qwen3-MoE: a top-k softmax router and dropless experts run
with a grouped matmul; routing record, replay and the load-balancing statistics.

Parameters (kinds of the `cfpo_jax.sharding` rule table; under `blocks` they carry the layer axis):
`router_kernel [D, E]`, `expert_gate_kernel`/`expert_up_kernel [E, D, F]`, `expert_down_kernel
[E, F, D]` (F = `moe_intermediate_size`), each expert a SwiGLU MLP.

Routing is Hugging Face's (`Qwen3MoeTopKRouter`): router logits in the compute dtype, softmax in
float32 over all E experts, the top k probabilities (ties: lowest index first, as `torch.topk` and
`lax.top_k`), renormalised to sum 1 when `norm_topk_prob`, cast back to the compute dtype. Every
token reaches all k of its experts: nothing is dropped, no capacity factor.

Dispatch: the N·k (token, expert) assignments are sorted by expert, the tokens gathered in that
order, and the three projections run as grouped matmuls over the E contiguous groups
(`jax.lax.ragged_dot`; with `config.moe_matmul="megablox"` the Pallas TPU kernel
`megablox.gmm`), then each output is weighted and added back to its token.

Which grouped matmul (benchmarks/README.md, "moe_matmul.py" and the MoE pod rows): XLA lowers
`ragged_dot` densely on TPU and on GPU alike — every row times every local expert, masked — so its
compiled FLOPs are tens of times the routed ones (42.7 × for one Qwen3-30B-A3B layer's forward +
backward on a v5e chip, 113.8 × on an H100; 70 × the model's FLOPs for 30b-a3b's decode step on
16 H100s). Megablox computes only the routed rows (its FLOPs are inside the kernel, a custom
call the HLO dot count does not see).
It runs inside this module's expert-parallel `shard_map` with `check_vma=False`: its pallas_call
output carries no varying-axes type, which `check_vma=True` requires ("When `check_vma=True` on
`jax.shard_map`, `manual_axis_type` on `jax.ShapeDtypeStruct` must not be `None`"). Without the
check, shard_map transposes the collectives plainly and rescales the cotangents of outputs
replicated over an axis, which gives the same gradients: tests/unit/models/test_moe.py checks the
output and every input's gradient against ragged_dot on one device (megablox run by the Pallas
interpreter, expert × fsdp × tensor = 2 × 2 × 2). The kernel leaves output rows past the groups
unwritten (the other shards' assignments here; NaN in the interpreter), in its forward and in its
input gradient, so `_grouped` zeroes them on both sides. ragged_dot stays the default (every
platform; its dense lowering is the cost); on TPU set `model.moe_matmul="megablox"`, as the
configs/math_qwen3_moe.py TPU launch lines do.

LoRA (`cfpo_jax.lora`) on a MoE model adapts attention only (q, k, v, o): a MoE layer has no dense
gate/up/down to adapt (asking for them is refused), and the router and the experts get no adapters
— they stay frozen while the adapters train (tests/unit/models/test_moe.py). Adapters on the
stacked experts ([E, D, r] × [E, r, F] per kernel, grouped like the kernels) are not built.

Replay (`routing_NxK` given): the experts are the given ones (e.g. the sampler's choice, recorded
while decoding) instead of the top k; their weights are the current router's probabilities of
those experts, renormalised as above — so the router still gets gradients, and a model whose own
choice agrees computes exactly what it computes without replay. The model's own top-k choice is
returned either way, for the routing-flip metric.

Expert parallelism: under a mesh with an 'expert' axis the experts are split over it
(`expert_*_kernel` rule: E over 'expert', D over 'fsdp', F over 'tensor'). `sparse_mlp` then runs
per shard under `shard_map`: each device all-gathers the tokens of its 'expert' group (the batch
is split over 'expert' too, see `cfpo_jax.sharding.BATCH_AXES`), runs only its own E / expert
experts on the assignments that chose them, and a reduce-scatter over 'expert' returns each token's
sum to the device that holds it (Megatron-Core's "allgather" token dispatcher; the exchange moves
expert × the tokens an all-to-all would, in exchange for static shapes and no capacity). The
'fsdp' slices of the expert weights are all-gathered per layer as the dense layers' are, and a
'tensor' split of F ends in a psum.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from cfpo_jax.models.config import ModelConfig

_INIT = nnx.initializers.normal(stddev=0.02)
# cfpo_jax.sharding.BATCH_AXES (models import no sharding code): the axes the tokens split over.
_BATCH_AXES = ("data", "fsdp", "expert")
_MEGABLOX_TILE = 128
# The Pallas interpreter runs megablox on any platform (tests on CPU); the TPU compiles the kernel.
_MEGABLOX_INTERPRET = False


@flax.struct.dataclass
class MoEStats:
    """What a forward pass of a MoE model reports besides its hidden states.

    experts_BxTxLxK: int32, the k experts each token's router chose in each layer (its own top k,
      also when another routing was replayed); unspecified on padding.
    aux_loss: float32 scalar, the Switch-Transformer load-balancing loss over the real tokens of all
      layers, exactly transformers' `load_balancing_loss_func` (E · Σ_e f_e · P_e with f_e the
      fraction of top-k assignments and P_e the mean router probability of expert e).
    """

    experts_BxTxLxK: jax.Array
    aux_loss: jax.Array


def route(logits_NxE, num_selected: int, norm_topk_prob: bool, dtype, replay_NxK=None):
    """(weights [N, k] in `dtype`, chosen experts [N, k] int32, own top k [N, k] int32, probabilities
    [N, E] float32) from router logits. With `replay_NxK` the chosen experts are those, except on
    tokens it marks -1 (nothing recorded: e.g. a sequence's last token, never fed to the sampler)."""
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    top_NxK, own_NxK = jax.lax.top_k(probs_NxE, num_selected)
    own_NxK = own_NxK.astype(jnp.int32)
    chosen_NxK = own_NxK
    if replay_NxK is not None:
        chosen_NxK = jnp.where(replay_NxK[:, :1] >= 0, replay_NxK.astype(jnp.int32), own_NxK)
        top_NxK = jnp.take_along_axis(probs_NxE, chosen_NxK, axis=-1)
    if norm_topk_prob:
        top_NxK = top_NxK / jnp.sum(top_NxK, axis=-1, keepdims=True)
    return top_NxK.astype(dtype), chosen_NxK, own_NxK, probs_NxE


def _grouped(x_AxI, kernel_GxIxO, group_sizes_G, implementation: str):
    """Rows of `x` in G contiguous groups times their group's kernel; rows past the groups give 0."""
    if implementation == "megablox":
        from jax.experimental.pallas.ops.tpu.megablox.ops import gmm

        rows = x_AxI.shape[0]
        padded = -(-rows // _MEGABLOX_TILE) * _MEGABLOX_TILE
        # The kernel leaves its output rows past the groups unwritten (whatever the buffer held;
        # NaN in interpret mode), in the forward and in its input gradient alike: zero them on
        # both sides, so neither the output nor the gradient of x reads them.
        valid_Ax1 = (jnp.arange(padded) < jnp.sum(group_sizes_G))[:, None]
        x_AxI = jnp.where(valid_Ax1, jnp.pad(x_AxI, ((0, padded - rows), (0, 0))), 0)
        tiling = tuple(min(_MEGABLOX_TILE, d) for d in (padded, x_AxI.shape[1], kernel_GxIxO.shape[2]))
        out_AxO = gmm(x_AxI, kernel_GxIxO, group_sizes_G, x_AxI.dtype, tiling, interpret=_MEGABLOX_INTERPRET)
        return jnp.where(valid_Ax1, out_AxO, 0)[:rows]
    return jax.lax.ragged_dot(x_AxI, kernel_GxIxO, group_sizes_G)


def grouped_mlp(x_NxD, weights_NxK, experts_NxK, gate_GxDxF, up_GxDxF, down_GxFxD, *, first_expert=0,
                implementation: str = "ragged_dot"):
    """Σ_k weights[n, k] · expert_{experts[n, k]}(x[n]) over the G experts [first_expert,
    first_expert + G) that these kernels hold; assignments to other experts add nothing. [N, D]."""
    N, K = experts_NxK.shape
    G = gate_GxDxF.shape[0]
    local_A = experts_NxK.reshape(-1) - first_expert
    mine_A = (local_A >= 0) & (local_A < G)
    key_A = jnp.where(mine_A, local_A, G)  # other shards' assignments sort last, past every group
    order_A = jnp.argsort(key_A, stable=True)
    group_sizes_G = jnp.bincount(key_A, length=G + 1)[:G].astype(jnp.int32)
    x_AxD = jnp.take(x_NxD, order_A // K, axis=0)
    gate_AxF = _grouped(x_AxD, gate_GxDxF, group_sizes_G, implementation)
    up_AxF = _grouped(x_AxD, up_GxDxF, group_sizes_G, implementation)
    out_AxD = _grouped(jax.nn.silu(gate_AxF) * up_AxF, down_GxFxD, group_sizes_G, implementation)
    weight_A = jnp.where(mine_A, weights_NxK.reshape(-1), 0).astype(out_AxD.dtype)[order_A]
    # Back to assignment order by the inverse permutation (a gather, not a scatter-add).
    inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(N * K, dtype=order_A.dtype))
    out_NxKxD = jnp.take(out_AxD * weight_A[:, None], inverse_A, axis=0).reshape(N, K, -1)
    return jnp.sum(out_NxKxD, axis=1)


def _axis(mesh, name: str, dim: int):
    """`name` when the mesh has it and it splits `dim`, else None (as cfpo_jax.sharding fits rules)."""
    return name if name in mesh.axis_names and dim % mesh.shape[name] == 0 and mesh.shape[name] > 1 else None


def sparse_mlp(x_BxTxD, weights_BxTxK, experts_BxTxK, gate_ExDxF, up_ExDxF, down_ExFxD, *,
               implementation: str = "ragged_dot"):
    """The experts' output [B, T, D] for the given routing; per shard of the mesh in context (see
    the module doc), or as one grouped matmul without a mesh."""
    B, T, D = x_BxTxD.shape
    K = experts_BxTxK.shape[-1]
    E, _, F = gate_ExDxF.shape
    mesh = jax.sharding.get_abstract_mesh()

    def local(x_BxTxD, weights_BxTxK, experts_BxTxK, gate_GxDxF, up_GxDxF, down_GxFxD, *, axes=None):
        first_expert = 0
        if axes is not None:
            ex, fs, tp, gather_tokens = axes
            if fs:  # whole expert weights for this layer, as XLA gathers the dense layers'
                gate_GxDxF = jax.lax.all_gather(gate_GxDxF, fs, axis=1, tiled=True)
                up_GxDxF = jax.lax.all_gather(up_GxDxF, fs, axis=1, tiled=True)
                down_GxFxD = jax.lax.all_gather(down_GxFxD, fs, axis=2, tiled=True)
            if gather_tokens:
                x_BxTxD, weights_BxTxK, experts_BxTxK = (
                    jax.lax.all_gather(a, ex, axis=0, tiled=True) for a in (x_BxTxD, weights_BxTxK, experts_BxTxK))
            if ex:
                first_expert = jax.lax.axis_index(ex) * gate_GxDxF.shape[0]
        b = x_BxTxD.shape[0]
        y_NxD = grouped_mlp(x_BxTxD.reshape(-1, D), weights_BxTxK.reshape(-1, K), experts_BxTxK.reshape(-1, K),
                            gate_GxDxF, up_GxDxF, down_GxFxD, first_expert=first_expert,
                            implementation=implementation)
        y_BxTxD = y_NxD.reshape(b, T, D)
        if axes is not None:
            if tp:
                y_BxTxD = jax.lax.psum(y_BxTxD, tp)
            if gather_tokens:
                y_BxTxD = jax.lax.psum_scatter(y_BxTxD, ex, scatter_dimension=0, tiled=True)
            elif ex:
                y_BxTxD = jax.lax.psum(y_BxTxD, ex)
        return y_BxTxD

    if mesh.empty:
        return local(x_BxTxD, weights_BxTxK, experts_BxTxK, gate_ExDxF, up_ExDxF, down_ExFxD)
    rows = tuple(a for a in _BATCH_AXES if a in mesh.axis_names)
    if B % math.prod(mesh.shape[a] for a in rows):
        rows = ()
    ex, fs, tp = _axis(mesh, "expert", E), _axis(mesh, "fsdp", D), _axis(mesh, "tensor", F)
    axes = (ex, fs, tp, bool(ex) and "expert" in rows)
    token_spec = P(rows or None)
    fn = jax.shard_map(
        lambda *args: local(*args, axes=axes), mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, P(ex, fs, tp), P(ex, fs, tp), P(ex, tp, fs)),
        out_specs=token_spec, check_vma=implementation != "megablox")
    return fn(x_BxTxD, weights_BxTxK, experts_BxTxK, gate_ExDxF, up_ExDxF, down_ExFxD)


class MoE(nnx.Module):
    """The sparse MLP of one layer (see the module doc)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F, pdt = config.hidden_size, config.num_experts, config.moe_intermediate_size, config.param_dtype
        self.config = config
        self.router_kernel = nnx.Param(_INIT(rngs.params(), (D, E), pdt))
        self.expert_gate_kernel = nnx.Param(_INIT(rngs.params(), (E, D, F), pdt))
        self.expert_up_kernel = nnx.Param(_INIT(rngs.params(), (E, D, F), pdt))
        self.expert_down_kernel = nnx.Param(_INIT(rngs.params(), (E, F, D), pdt))

    def forward(self, x_BxTxD, replay_BxTxK=None):
        """(output [B, T, D], own top-k experts [B, T, k] int32, router probabilities [B, T, E]
        float32); the experts run are `replay_BxTxK` when given, else the own top k."""
        B, T, D = x_BxTxD.shape
        dtype = x_BxTxD.dtype
        logits_NxE = jnp.matmul(x_BxTxD.reshape(-1, D), self.router_kernel[...].astype(dtype))
        replay_NxK = None if replay_BxTxK is None else replay_BxTxK.reshape(B * T, -1)
        weights_NxK, chosen_NxK, own_NxK, probs_NxE = route(
            logits_NxE, self.config.num_experts_per_tok, self.config.norm_topk_prob, dtype, replay_NxK)
        y_BxTxD = sparse_mlp(
            x_BxTxD, weights_NxK.reshape(B, T, -1), chosen_NxK.reshape(B, T, -1),
            self.expert_gate_kernel[...].astype(dtype), self.expert_up_kernel[...].astype(dtype),
            self.expert_down_kernel[...].astype(dtype), implementation=self.config.moe_matmul)
        return y_BxTxD, own_NxK.reshape(B, T, -1), probs_NxE.reshape(B, T, -1)

    def __call__(self, x_BxTxD):
        """[B, T, D] -> [B, T, D], the model's own routing (what the sampler's decode step runs)."""
        return self.forward(x_BxTxD)[0]


def balance_sums(experts_BxTxK, probs_BxTxE, valid_BxT):
    """One layer's (top-k assignment counts [E], router probability sums [E], real tokens) over
    the tokens where `valid_BxT`: the terms `aux_loss` sums over layers."""
    E = probs_BxTxE.shape[-1]
    valid_BxTx1 = valid_BxT[..., None].astype(jnp.float32)
    counts_E = jnp.sum(jax.nn.one_hot(experts_BxTxK, E, dtype=jnp.float32) * valid_BxTx1[..., None], axis=(0, 1, 2))
    return counts_E, jnp.sum(probs_BxTxE * valid_BxTx1, axis=(0, 1)), jnp.sum(valid_BxTx1)


def aux_loss(counts_LxE, prob_sums_LxE, tokens_L):
    """transformers' `load_balancing_loss_func` from per-layer `balance_sums`: float32 scalar."""
    total = jnp.maximum(jnp.sum(tokens_L), 1.0)
    E = counts_LxE.shape[-1]
    return E * jnp.sum((jnp.sum(counts_LxE, 0) / total) * (jnp.sum(prob_sums_LxE, 0) / total))


def routing_flips(own_BxTxLxK, replayed_BxTxLxK, mask_BxT):
    """(fraction of tokens whose own top-k set differs from the replayed one in any layer, fraction
    of (token, layer) pairs that differ), float32 scalars, over the tokens of `mask_BxT` that have
    a recorded routing (not -1); the order within k is ignored."""
    differ_BxTxL = jnp.any(jnp.sort(own_BxTxLxK, axis=-1) != jnp.sort(replayed_BxTxLxK, axis=-1), axis=-1)
    mask_BxT = ((mask_BxT != 0) & (replayed_BxTxLxK[:, :, 0, 0] >= 0)).astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask_BxT), 1.0)
    token_frac = jnp.sum(jnp.any(differ_BxTxL, axis=-1) * mask_BxT) / tokens
    layer_frac = jnp.sum(jnp.mean(differ_BxTxL.astype(jnp.float32), axis=-1) * mask_BxT) / tokens
    return token_frac, layer_frac


def rollout_routing(prompt_routing_BxQxLxK, prompt_mask_BxP, step_routing_BxNxLxK):
    """The routing of rollout rows (prompt left-padded to P, then N completion columns), [B, P + N,
    L, k] in the dtype of the steps' (the sampler keeps int16), -1 where nothing was recorded (padding, and the last completion token, which
    the sampler never feeds), from what the sampler records (`decoding.prefill` and
    `decoding.decode_step` with `record_routing`):

    prompt_routing_BxQxLxK: the prefill's of the prompts without their last column (Q = P - 1),
      left-aligned (column c: the row's c-th prompt token); columns at or past its prompt length
      - 1 are ignored (the last prompt token is fed by decode step 0).
    step_routing_BxNxLxK: decode step s's, the token fed at step s: the last prompt token at s = 0,
      then completion token s - 1; steps past the row's end are ignored by the caller's mask.
    """
    B, P = prompt_mask_BxP.shape
    length_B = jnp.sum(prompt_mask_BxP != 0, axis=1, dtype=jnp.int32)
    column_P = jnp.arange(P)
    # Rollout column c < P - 1 holds the prompt's token c - (P - length); the prefill covers those.
    source_BxP = column_P[None] - (P - length_B[:, None])
    prefilled_BxP = (source_BxP >= 0) & (column_P[None] < P - 1)
    prompt_BxPxLxK = jnp.take_along_axis(
        prompt_routing_BxQxLxK, jnp.clip(source_BxP, 0, max(P - 2, 0))[:, :, None, None], axis=1)
    prompt_BxPxLxK = jnp.where(prefilled_BxP[:, :, None, None], prompt_BxPxLxK, -1)
    # Decode step s fed rollout column P - 1 + s: the last prompt column, then the completion.
    prompt_BxPxLxK = prompt_BxPxLxK.at[:, P - 1].set(step_routing_BxNxLxK[:, 0])
    completion_BxNxLxK = jnp.concatenate(
        [step_routing_BxNxLxK[:, 1:], jnp.full_like(step_routing_BxNxLxK[:, :1], -1)], axis=1)
    return jnp.concatenate([prompt_BxPxLxK.astype(step_routing_BxNxLxK.dtype), completion_BxNxLxK], axis=1)
