"""The trainer's and sampler's own programs with abstract inputs, ready to lower for any mesh.

Each `Program` is a jitted function that a run calls — built by the learner's
`learner.make_programs`, the sampler's jitted insert (prefill) and decode chunk, the reward model's
forward — together with `jax.ShapeDtypeStruct` arguments carrying the shardings the run gives
them, at a config's shapes. Nothing is materialised, so a 7B model's update can be lowered and
compiled for a mesh of compile-only devices (`cfpo_jax.aot.targets`) or fake CPU devices.
Lower them with the mesh in context (`mesh_context`), as the run traces them
(`cfpo_jax.aot.report.compile_program` does).

Programs, per config (rows R = batch_size × group_size, P the prompt bucket, N max_new_tokens):
* update: one minibatch (R / num_minibatches rows) of the micro-batched forward/backward and
  AdamW (or the adapters' update with LoRA); donated state;
* prepare: the rollout's device half — the old-logprob pass over R rows (off policy only) and the
  reference pass (β > 0), advantages;
  with `rl.pack` both packed at their largest row bucket (as many packed rows as sequences:
  every completion full length). A run takes the unpacked layout there instead (packing would
  save no row), so this program never runs as such; it bounds both, its memory being the
  unpacked program's plus the plan's index arrays (about 1%, benchmarks/packing.py), and it is
  what holds the segment-id attention kernels a packed run compiles;
* prefill: the sampler's insert of the largest prompt batch it prefills at once, into the slots;
* decode: the sampler's decode chunk over all slots (a `while_loop` of decode steps) with the KV
  cache `max_concurrent`/`kv_cache_gb` gives;
* reward: the reward model's forward (configs with a `rm:` reward), at the trainer's shapes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from cfpo_jax import batch, data, learner, lora, models, packing, sampling, sharding, weight_sync
from cfpo_jax import state as state_lib
from cfpo_jax.models import decoding
from cfpo_jax.models.attention import resolve_decode


@dataclasses.dataclass(frozen=True)
class Program:
    jitted: object  # the run's own jitted function
    args: tuple  # ShapeDtypeStructs with the run's shardings
    model_flops: float  # analytic: 6·active·tokens (update), 2·active·tokens (forwards): `active_params`
    tokens: int  # tokens the program processes (rows × length)


def mesh_context(mesh):
    """The mesh in context while tracing, as `jax.set_mesh(mesh)` puts it for a run, but abstract
    only: with compile-only devices nothing can be placed on the mesh, and the splash kernel builds
    its mask tables eagerly (on the default CPU device here; they become constants)."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_policy(config, model_config, mesh):
    """(graphdef, params, frozen): the policy split as the trainer splits it (the adapters train
    with LoRA, else every parameter), ShapeDtypeStructs with the trainer's shardings."""
    def build():
        model = models.Transformer(model_config, rngs=nnx.Rngs(0))
        if config.lora.rank:
            model = lora.adapt(model, rank=config.lora.rank, alpha=config.lora.alpha,
                               targets=config.lora.targets, seed=config.seed)
        return model

    model = nnx.eval_shape(build)
    graphdef, params, frozen = lora.split(model) if config.lora.rank else nnx.split(model, nnx.Param, ...)
    params = _abstract(params, sharding.param_shardings(mesh, params))
    frozen = _abstract(frozen, sharding.param_shardings(mesh, frozen))
    return graphdef, params, frozen


# The stacked experts' kernels of a mixture of experts (`cfpo_jax.models.moe.MoE`): a token runs
# num_experts_per_tok of their num_experts slices.
_EXPERT_KERNELS = ("expert_gate_kernel", "expert_up_kernel", "expert_down_kernel")


def active_params(tree, model_config) -> float:
    """The parameters of `tree` one token runs through: all of them for a dense model; for a
    mixture of experts the experts' kernels count k / E of their size (k = num_experts_per_tok of
    E = num_experts) and everything else (embeddings, attention, norms, router, adapters) whole.
    The analytic model FLOPs are 6 (update) or 2 (forward) × this × tokens."""
    def size(path, x):
        if model_config.num_experts and any(getattr(k, "key", None) in _EXPERT_KERNELS for k in path):
            return x.size * model_config.num_experts_per_tok / model_config.num_experts
        return x.size
    return sum(size(path, x) for path, x in jax.tree_util.tree_leaves_with_path(tree))


def learner_programs(config, model_config, mesh) -> dict[str, Program]:
    """The update and the prepare pass (old logprobs, reference logprobs) of `config` with the
    model `model_config`, from `learner.make_programs`, on the abstract inputs the trainer gives
    them (`batch.spec`, `packing.spec`: the layouts' own constructors)."""
    rl, sampling_config = config.rl, config.sampling
    graphdef, params, frozen = abstract_policy(config, model_config, mesh)
    adapters = config.lora.rank > 0
    tx, schedule = state_lib.make_optimizer(config.optim, state_lib.total_updates(config))
    _, abstract_state = state_lib.create_state(params, tx, mesh, seed=config.seed, beta=rl.beta,
                                           adapters=adapters)
    programs = learner.make_programs(
        config, mesh, graphdef, pad_id=0, tx=tx, schedule=schedule,
        state_sh=jax.tree.map(lambda x: x.sharding, abstract_state),
        frozen_sh=jax.tree.map(lambda x: x.sharding, frozen))

    batch_sh = sharding.batch_sharding(mesh)
    column = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
    rollout = config.data.batch_size * rl.group_size
    rows = rollout // rl.num_minibatches
    N = sampling_config.max_new_tokens
    P = data.bucket_width(sampling_config.max_prompt_len)
    replay = config.model.moe_routing == "replay"  # the rollout carries a MoE's routing
    routing = (model_config.num_layers, model_config.num_experts_per_tok) if replay else None
    # With `rl.pack` the packed layout at its largest row bucket
    minibatch = batch.spec(rl, rows=rows, prompt_width=P, completion_width=N, packed=rl.pack,
                           sharding=batch_sh, routing=routing)
    samples = sampling.Samples(
        prompt_tokens=column((rollout, P), jnp.int32), prompt_mask=column((rollout, P), jnp.int32),
        tokens=column((rollout, N), jnp.int32), mask=column((rollout, N), jnp.int32),
        logprobs=column((rollout, N), jnp.float32), lengths=column((rollout,), jnp.int32),
        eos=column((rollout,), jnp.bool_),
        routing=column((rollout, P + N, *routing), jnp.int16) if replay else None)
    reward = jax.ShapeDtypeStruct((rollout,), jnp.float32, sharding=NamedSharding(mesh, PS()))
    plan = None
    if rl.pack and learner.prepare_runs_model(rl):
        # The learner's plan of the whole rollout, at its largest row bucket
        plan = packing.spec(rows=rollout, sequences=rollout, prompt_width=P, completion_width=N,
                            sharding=batch_sh)

    # Analytic FLOPs count the weights (base and adapters) a token runs through, over every token.
    weights = active_params(params, model_config) + active_params(frozen, model_config)
    on_policy = batch.is_on_policy(rl)
    forwards = (0 if on_policy else 1) + (1 if rl.beta > 0 else 0) + (
        1 if rl.beta > 0 and rl.kl_in_reward and on_policy else 0)
    update = programs["update_packed" if rl.pack else "update"]
    return dict(
        update=Program(update, (abstract_state, frozen, minibatch),
                       6 * weights * rows * (P + N), rows * (P + N)),
        prepare=Program(programs["prepare"],
                        (params, abstract_state.get("ref_params"), frozen, samples, reward, plan),
                        2 * forwards * weights * rollout * (P + N), forwards * rollout * (P + N)),
    )


def sampler_programs(config, model_config, mesh) -> dict[str, Program]:
    """The sampler's prefill (insert) and decode chunk for `config`'s rollout, from the sampler's
    own jitted functions, with its slot layout (`sampling.slot_layout`)."""
    s, rl = config.sampling, config.rl
    graphdef, params, frozen = abstract_policy(config, model_config, mesh)
    policy = nnx.merge(graphdef, params, frozen)
    if config.lora.rank and config.lora.merge_for_sampling:
        policy = nnx.eval_shape(lambda: lora.merge(nnx.merge(graphdef, params, frozen)))
    engine = sampling.engine_settings(s)
    P = data.bucket_width(s.max_prompt_len)
    N = s.max_new_tokens
    num_rows = config.data.batch_size * rl.group_size
    with mesh_context(mesh):  # the chips' decode kernel and cache dtype
        attention = resolve_decode(engine["attention"], model_config.dtype, model_config.head_dim)
        num_cache_slots, num_slots, max_prefill = sampling.slot_layout(
            model_config, prompt_len=P, max_new_tokens=N, num_rows=num_rows, mesh=mesh,
            max_concurrent=engine["max_concurrent"], kv_cache_gb=engine["kv_cache_gb"], attention=attention)
    shards = _batch_shards(mesh)
    # The first insert's prompts: those of the rows that fill every slot, rounded as the sampler
    # rounds (a power of two, a multiple of the shards), at most `max_prefill`.
    prompts = -(-min(num_slots, num_rows) // rl.group_size)
    M = min(max_prefill, -(-(1 << (prompts - 1).bit_length()) // shards) * shards)

    settings = sampling.Settings(
        max_new_tokens=N, temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
        eos_token_ids=(0,), pad_id=0, mesh=mesh, attention=attention,
        record_routing=config.model.moe_routing == "replay")
    policy_graphdef, policy_state = nnx.split(policy)
    policy_state = _abstract(policy_state, sharding.param_shardings(mesh, policy_state))
    weights = _lowered_outputs(decoding.gather_program, policy_graphdef, nnx.split(policy.blocks)[0],
                               mesh, str(jnp.dtype(model_config.dtype)), policy_state)
    slots, outputs = _lowered_outputs(sampling.init_program, settings, model_config, num_slots,
                                      num_cache_slots, num_rows)
    replicated = NamedSharding(mesh, PS())
    host = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    weights_count = active_params(params, model_config) + active_params(frozen, model_config)
    prefill = (settings, weights, slots, host((M, P), jnp.int32), host((M, P), jnp.int32),
               host((num_slots,), jnp.int32), host((num_slots,), jnp.int32))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    decode = (settings, weights, slots, outputs, key, host((num_rows,), jnp.int32), host((), jnp.int32))
    return dict(
        prefill=Program(sampling.prefill_program, prefill, 2 * weights_count * M * (P - 1), M * (P - 1)),
        # One decode step per slot; the chunk loops over up to N of them.
        decode=Program(sampling.decode_program, decode, 2 * weights_count * num_slots, num_slots),
    )


def reward_program(config, model_config, mesh) -> Program:
    """The reward model's jitted forward (`rewards.reward_model.RewardModel`'s) over the rollout's
    rows at the reward model's width (`config.rewards.rm_max_len`)."""
    from cfpo_jax.rewards import reward_model

    model = nnx.eval_shape(lambda: models.Transformer(model_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    state = _abstract(state, sharding.param_shardings(mesh, state))
    rows = config.data.batch_size * config.rl.group_size
    rows += -rows % _batch_shards(mesh)
    if config.rewards.rm_batch_size:
        rows = min(rows, config.rewards.rm_batch_size + -config.rewards.rm_batch_size % _batch_shards(mesh))
    width = config.rewards.rm_max_len
    batch_sh = sharding.batch_sharding(mesh)
    column = jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=batch_sh)
    return Program(reward_model.forward, (graphdef, state, column, column),
                   2 * active_params(state, model_config) * rows * width, rows * width)


def _batch_shards(mesh) -> int:
    return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)


def _lowered_outputs(jitted, *args):
    """The abstract outputs of `jitted(*args)` with the shardings its compiled program gives them
    (the lowering leaves those set by sharding constraints undecided)."""
    with mesh_context(args[2] if jitted is decoding.gather_program else args[0].mesh):
        lowered = jitted.lower(*args)
        shardings = lowered.compile().output_shardings
    return jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), lowered.out_info, shardings)


def weight_sync_program(config, model_config, learner_mesh, rollout_mesh):
    """(Program, union mesh): the learner → rollout move of the policy's trained parameters
    across processes (`weight_sync.send_program`, a ppermute over the union of the two meshes),
    on the learner's shardings of `config`'s policy."""
    _, params, _ = abstract_policy(config, model_config, learner_mesh)
    union, _ = weight_sync.union_meshes(learner_mesh, rollout_mesh)
    args = tuple(jax.ShapeDtypeStruct((2 * x.shape[0], *x.shape[1:]), x.dtype,
                                      sharding=weight_sync.union_sharding(union, x.sharding.spec, x.ndim))
                 for x in jax.tree.leaves(params))
    program = weight_sync.send_program(union, [a.sharding.spec for a in args])
    return Program(program, args, 0.0, 0), union

