"""The decoder as the sampler runs it: weights gathered once into a sampling layout, a prefill of
new rows, and one decode step over a fixed number of cache slots.

* `SamplingWeights` (from `gather_weights`, once per `generate` call): every floating weight cast
  to the compute dtype, the stacked layers split into one state per layer, and, on a mesh, laid
  out as decoding wants them — the 'fsdp' split of `cfpo_jax.sharding.RULES` dropped (so every
  batch shard holds whole weights and no decode step all-gathers), the 'tensor' split kept. Cost:
  one more copy of the weights, `num_params × itemsize(dtype) / tensor` bytes per device (a 7B
  model in bfloat16 with tensor = 1: 15.2 GB), alive for the call; the FSDP-sharded originals are
  untouched. Separate per-layer buffers let the unrolled layer loop below read each layer's
  weights where they lie, instead of slicing (copying) them out of the stacked arrays every step.
  On CPU a model with tied embeddings also gets its unembedding as its own [D, V] array
  (`head_DxV`, V·D·itemsize more: 56.6 MB for SmolLM2 in bfloat16): XLA:CPU's dot against the
  embedding transposed took 1.1–2.3× the time of the same dot against a [D, V] array inside the
  decode loop, and 6× alone (benchmarks/README.md, "A C++ matmul for the sampler").
* `SlotCache`: one key and one value buffer per layer, `[slots, kv_heads, S, head_dim]`, in the
  compute dtype (float32 on CPU: `cache_dtype`). The layer loop is unrolled (a Python loop, not
  the trainer's `lax.scan`) so each layer's buffer is its own array: a decode step writes one
  column per slot in place and decode attention reads the
  buffer where it lies (`cfpo_jax.models.attention.decode_attention`) — no per-layer slice of a stacked
  cache, which copied the whole layer's cache every step (benchmarks/README.md). The price is a
  compiled program that grows with depth (one copy of a layer per layer), as in Tunix and vLLM.
* A row's tokens sit left-aligned in its slot: cache column c holds the token at position c, so
  its valid columns are [0, length) — the convention of paged decode kernels (jax's TPU
  `paged_attention` has no start offset). `prefill` takes left-padded prompts (the prefill
  batch's layout) and returns their keys shifted to column 0.
* The maths is the trainer's: the same `Block` modules (`Attention.qkv` / `Attention.out`, MLP,
  RMSNorm), RoPE and embedding/unembedding of `cfpo_jax.models.transformer`, and the prefill's
  full-sequence attention is the trainer's kernel (`config.attention`); only the decode attention
  differs in what it reads, and on CPU the projections' kernel (`matmul`, see
  `cfpo_jax.models.matmul`: float32 sums in another order). tests/unit/test_sampling.py checks
  the sampler against transformers.
* Routing record (mixture of experts, `record_routing=True`): `prefill` and `decode_step` also
  return the experts each fed token's router chose in every layer, in the cache's column layout,
  for the learner to replay (`cfpo_jax.models.moe`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from cfpo_jax.models.attention import causal_attention, decode_attention, target_platform
from cfpo_jax.models.matmul import kernel as matmul_kernel
from cfpo_jax.models.transformer import default_positions, dense, rope_angles


@flax.struct.dataclass
class SamplingWeights:
    """top: the model's state with each stacked-layer leaf replaced by a 0-d placeholder (only the
    embedding, final norm and head are read from it); layers: one Block state per layer;
    head_DxV: on CPU for tied embeddings the unembedding [D, V] (the embedding transposed), else
    None."""

    top: nnx.State
    layers: tuple
    head_DxV: jax.Array | None
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    block_graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)

    def model(self):
        """The Transformer for its embedding, final norm and unembedding (its blocks are empty)."""
        return nnx.merge(self.graphdef, self.top)

    def block(self, layer: int):
        return nnx.merge(self.block_graphdef, self.layers[layer])

    def unembed(self, model, hidden_BxTxD):
        """Logits [B, T, V] float32: `model.unembed`, from `head_DxV` where there is one."""
        if self.head_DxV is None:
            return model.unembed(hidden_BxTxD)
        return dense(hidden_BxTxD, self.head_DxV, preferred_element_type=jnp.float32)


@flax.struct.dataclass
class SlotCache:
    """Keys and values per layer, each [slots, kv_heads, S, head_dim]."""

    k: tuple
    v: tuple


def _sampling_spec(mesh, names, shape):
    """The parameter's rule with 'fsdp' dropped: whole weights on every batch shard."""
    from cfpo_jax.sharding import partition_spec

    spec = partition_spec(mesh, names, shape)
    return PS(*(None if axis == "fsdp" else axis for axis in spec))


def _gather(graphdef, block_graphdef, mesh, dtype, state):
    def cast(path, x):
        x = x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        if mesh is not None:
            names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _sampling_spec(mesh, names, x.shape)))
        return x

    state = jax.tree_util.tree_map_with_path(cast, state)
    blocks = state["blocks"]
    num_layers = jax.tree.leaves(blocks)[0].shape[0]
    layers = tuple(jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers))
    top = nnx.State({**{k: v for k, v in state.items() if k != "blocks"},
                     "blocks": jax.tree.map(lambda x: jnp.zeros((), x.dtype), blocks)})
    config = nnx.merge(graphdef, state).config
    head_DxV = None
    if config.tie_embeddings and not config.num_labels and target_platform() == "cpu":
        head_DxV = state["embedding"][...].T
    return SamplingWeights(top=top, layers=layers, head_DxV=head_DxV, graphdef=graphdef,
                           block_graphdef=block_graphdef)


gather_program = jax.jit(_gather, static_argnums=(0, 1, 2, 3))


def gather_weights(model, mesh=None) -> SamplingWeights:
    """The sampling layout of `model`'s weights (see the module doc); one jitted gather."""
    graphdef, state = nnx.split(model)
    block_graphdef, _ = nnx.split(model.blocks)
    return gather_program(graphdef, block_graphdef, mesh, str(jnp.dtype(model.config.dtype)), state)


def cache_dtype(config) -> jnp.dtype:
    """The KV cache's dtype, for the program being traced: the compute dtype, but float32 on CPU
    for a sub-float32 one. XLA:CPU writes a decode step's column into a bfloat16 buffer by
    converting the whole buffer to float32 and back (two more passes over every layer's cache
    per step: 23 % of SmolLM2's profiled bfloat16 step at 32 rows); float32 is scattered in
    place. The float32 cache holds the same bfloat16 keys and values exactly and attention reads
    them back as bfloat16, so the numbers are those of a bfloat16 cache, for twice its memory
    (benchmarks/README.md)."""
    dtype = jnp.dtype(config.dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 and target_platform() == "cpu" else dtype


def init_slot_cache(config, num_slots: int, num_cache_slots: int) -> SlotCache:
    shape = (num_slots, config.num_kv_heads, num_cache_slots, config.head_dim)
    dtype = cache_dtype(config)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))  # noqa: E731
    return SlotCache(k=zeros(), v=zeros())


def _mlp(block, x_BxTxD, record: bool):
    """The block's MLP output, and with `record` its own top-k experts [B, T, k] (a MoE block)."""
    if not record:
        return block.mlp(x_BxTxD), None
    y_BxTxD, experts_BxTxK, _ = block.mlp.forward(x_BxTxD)
    return y_BxTxD, experts_BxTxK


def prefill(weights: SamplingWeights, tokens_MxT, mask_MxT, *, record_routing: bool = False,
            matmul: str = "xla"):
    """Keys and values of M left-padded prompts, per layer [M, kv_heads, T, head_dim] (compute
    dtype), causal over real tokens; positions from the mask as in the trainer. Returned
    left-aligned: row m's real tokens in columns [0, sum(mask_MxT[m])), the columns after them
    unspecified. With `record_routing` (a MoE model) also the experts of every token, int32
    [M, T, L, k], left-aligned the same way. `matmul`: the projections' kernel
    (`cfpo_jax.models.matmul`, resolved)."""
    with matmul_kernel(matmul):
        model = weights.model()
        T = tokens_MxT.shape[1]
        sin_MxTxH, cos_MxTxH = rope_angles(model.config, default_positions(mask_MxT))
        x_MxTxD = model._embed(tokens_MxT)
        # Column c of the output reads input column c + (row's padding), clipped.
        padding_M = T - jnp.sum(mask_MxT != 0, axis=1, dtype=jnp.int32)
        source_Mx1xTx1 = jnp.minimum(jnp.arange(T)[None] + padding_M[:, None], T - 1)[:, None, :, None]
        keys, values, experts = [], [], []
        for layer in range(len(weights.layers)):
            block = weights.block(layer)
            q_MxTxNxH, k_MxTxKxH, v_MxTxKxH = block.attn.qkv(block.attn_norm(x_MxTxD), sin_MxTxH, cos_MxTxH)
            attn_MxTxNxH = causal_attention(q_MxTxNxH, k_MxTxKxH, v_MxTxKxH, mask_MxT,
                                            implementation=model.config.attention)
            x_MxTxD = x_MxTxD + block.attn.out(attn_MxTxNxH)
            y_MxTxD, experts_MxTxK = _mlp(block, block.mlp_norm(x_MxTxD), record_routing)
            x_MxTxD = x_MxTxD + y_MxTxD
            keys.append(jnp.take_along_axis(k_MxTxKxH.swapaxes(1, 2), source_Mx1xTx1, axis=2))
            values.append(jnp.take_along_axis(v_MxTxKxH.swapaxes(1, 2), source_Mx1xTx1, axis=2))
            if record_routing:
                experts.append(jnp.take_along_axis(experts_MxTxK, source_Mx1xTx1[:, 0], axis=1))
        if record_routing:
            return keys, values, jnp.stack(experts, axis=2)
        return keys, values


def decode_step(weights: SamplingWeights, token_K, cache: SlotCache, column_K, *, implementation: str = "auto",
                record_routing: bool = False, matmul: str = "xla"):
    """Feeds one token per slot at position column_K[k]: writes its key/value at that cache column
    of slot k (in place) and attends over columns [0, column_K[k]] (`attention.decode_attention`
    with `implementation`, per shard of the mesh in context). Returns (logits [K, V] float32, cache),
    and with `record_routing` (a MoE model) third the fed tokens' experts, int32 [K, L, k].
    `matmul`: the projections' kernel (`cfpo_jax.models.matmul`, resolved)."""
    with matmul_kernel(matmul):
        model = weights.model()
        num_slots = token_K.shape[0]
        sin_Kx1xH, cos_Kx1xH = rope_angles(model.config, column_K[:, None])
        x_Kx1xD = model._embed(token_K[:, None])
        slot_Kx1 = jnp.arange(num_slots)[:, None]
        head_1xG = jnp.arange(model.config.num_kv_heads)[None]
        column_Kx1 = column_K[:, None]
        keys, values, experts = list(cache.k), list(cache.v), []
        for layer in range(len(weights.layers)):
            block = weights.block(layer)
            q_Kx1xNxH, k_Kx1xGxH, v_Kx1xGxH = block.attn.qkv(block.attn_norm(x_Kx1xD), sin_Kx1xH, cos_Kx1xH)
            # One [head_dim] row per (slot, kv head): a write window on the minor dim only. With a
            # [kv_heads, head_dim] window per slot the TPU compiler gave the loop's cache a
            # kv-heads-minor layout and copied every layer's cache into the decode kernel's layout
            # at every step (benchmarks/README.md, compile.py, 2026-12-03 second session).
            write_at = (slot_Kx1, head_1xG, column_Kx1)
            keys[layer] = keys[layer].at[write_at].set(k_Kx1xGxH[:, 0].astype(keys[layer].dtype))
            values[layer] = values[layer].at[write_at].set(v_Kx1xGxH[:, 0].astype(values[layer].dtype))
            attn_KxNxH = decode_attention(q_Kx1xNxH[:, 0], keys[layer], values[layer], column_K + 1,
                                          implementation=implementation)
            x_Kx1xD = x_Kx1xD + block.attn.out(attn_KxNxH[:, None])
            y_Kx1xD, experts_Kx1xk = _mlp(block, block.mlp_norm(x_Kx1xD), record_routing)
            x_Kx1xD = x_Kx1xD + y_Kx1xD
            experts.append(experts_Kx1xk)
        logits_Kx1xV = weights.unembed(model, model.final_norm(x_Kx1xD))
        out = logits_Kx1xV[:, 0], SlotCache(k=tuple(keys), v=tuple(values))
        return (*out, jnp.stack(experts, axis=1)[:, :, 0]) if record_routing else out
