"""`python -m cfpo_jax.train --config=configs/<name>.py[:arg] [--workdir=DIR] [--config.x.y=v]`.

The file reads top to bottom in the order a run happens (ARCHITECTURE.md, "Data flow"):

  1. build state  mesh, policy, tokenizer, data, rewards; the training state created with its
                  shardings, big_vision style (`jax.eval_shape` → `state_shardings` →
                  `jit(init_state, out_shardings=...)`), or restored from the latest checkpoint;
                  on a fresh start the supervised warm start (`cfpo_jax.warmstart`) runs first.
  2. rollout      sample (device) → completion text → rewards (host) → advantages, old and
                  reference logprobs (device).
  3. learn        num_epochs × num_minibatches calls of the jitted pure `update(state, batch)`.
  4. log, checkpoint, evaluate.

Decisions written down here:
  * The training state is a dict pytree {params, opt_state, rng, step, updates, skipped_updates,
    and ref_params only when β > 0}; `step` counts RL steps, `updates` optimiser updates actually
    applied (it drives the learning-rate schedule), `skipped_updates` those refused because the
    loss or a gradient was not finite. Every leaf is created with its final sharding (params and
    the optimiser moments FSDP-sharded alike, scalars replicated), so `update` returns the state
    in the shardings it was given and compiles once per batch shape.
  * One RL step's tensors stay on device. The host fetches the completion tokens (for reward
    text) and, once per step, the scalar metrics; the rewards go up once. Stages 2 after scoring
    and 3 run under `jax.transfer_guard("disallow")`: an implicit transfer there is an error.
  * Old logprobs are recomputed by the trainer (the sampler's own logprobs only feed the
    `sampler_logprob_gap` metric) — except on policy: with num_epochs = num_minibatches = 1 the
    one update sees the rollout policy itself, so old = current logprobs with a stopped gradient
    (ratio exactly 1, gradient A·∇logp, as CFPO's and PPO's maths allow) and no separate forward
    runs; the entropy and sampler-gap metrics then come from the update's forward.
  * Gradient accumulation is exact: the loss denominators (token or sequence counts) depend only on
    the masks, so they are computed for the whole minibatch first and each micro-batch contributes
    grad(loss_sum_i / denominator); the sum over micro-batches is the full-minibatch gradient.
  * Minibatches are a fresh permutation of the rollout per epoch, drawn from (seed, step, epoch)
    so a resumed run draws the same ones. The permutation is drawn on the host (B integers; the
    packer plans from it) and uploaded; the rows are gathered on device.
  * Sequence packing (`rl.pack`, `cfpo_jax.packing`): the update, the old-logprob and the
    reference passes see packed rows. The host plans each minibatch after the epoch's
    permutation (the lengths are host facts: prompts are tokenised there, completion lengths come
    back with the completion text), uploads the plan's index arrays, and the device gathers the
    packed minibatch from the rollout it holds (`Setup.pack`). Losses and metrics run on the
    packed completion layout [R, N] with per-sequence sums by sequence id, so they equal the
    unpacked ones; the old and reference logprobs are unpacked back to [B, N] in the rollout.
    Packed row counts come from a ladder (`packing.row_ladder`): the distinct learner shapes a
    run compiled are logged as the `learner_shapes` metric. Where a plan would need as many rows
    as the unpacked minibatch (every sequence near full length), packing saves nothing and its
    gathers and index arrays only cost: that minibatch (or rollout) takes the unpacked layout
    (`Setup.plan` returns None). Each program decides at trace time from its batch's keys, so
    one jitted function serves both layouts.
  * The sampler gets a key split off the state's rng each step: same seed and same data iterator
    state → same samples, which is what makes a resumed run equal an uninterrupted one.
  * Multi-turn episodes (`config.env.name`, `cfpo_jax.envs`): the rollout samples episodes through
    `Setup.env` instead of single completions; each episode is one sequence (prompt, then every
    token after it) and the batch's `mask` is `Samples.loss_mask` — the tokens the policy sampled —
    while `attn` covers the tool answers too, so they are context for every logprob but out of
    the loss, the ratios, the KL and the metrics. The learner is unchanged.
  * LoRA (`config.lora.rank` > 0, `cfpo_jax.lora`): `params` are the adapters alone, so the
    optimiser state and the checkpoints hold adapters only; the frozen base is `Setup.frozen`, an
    argument of every jitted function (a closed-over array would be compiled in as a constant),
    never differentiated or donated. The reference policy for β > 0 is the base, i.e. the policy
    with its adapters disabled (`lora.disabled`): no `ref_params` copy. Checkpoints carry the
    base's `lora.base_fingerprint`; a resume with another base is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS
from ml_collections import config_flags

from cfpo_jax import advantages, checkpoint, data, envs, evaluate, losses, models, rewards, sampling
from cfpo_jax import lora, packing, sharding, tiny, warmstart
from cfpo_jax import config as config_lib
from cfpo_jax import logging as metrics_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quickstart.py")
# No default here: ml_collections would parse the default and its overrides at import time, out of
# reach of `_parse_flags`; the quickstart is put in argv there instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Training config file (default {_DEFAULT_CONFIG}).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where everything goes; overrides config.workdir.")


# ============================================================================ optimiser


def make_optimizer(optim: ml_collections.ConfigDict, total_updates: int):
    """optax AdamW with linear warmup then `schedule`, after global-norm clipping."""
    decay_steps = max(total_updates - optim.warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(optim.lr),
        "cosine": optax.cosine_decay_schedule(optim.lr, decay_steps),
        "linear": optax.linear_schedule(optim.lr, 0.0, decay_steps),
    }[optim.schedule]
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), after], [optim.warmup_steps]
    ) if optim.warmup_steps else after
    chain = [optax.clip_by_global_norm(optim.max_grad_norm)] if optim.max_grad_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
    return optax.chain(*chain), schedule


# ============================================================================ scoring completions


def _micro_batches(tree, micro_size: int):
    """[B, ...] leaves → [M, b, ...] with micro-batch j = rows {i·M + j}: each device keeps its rows."""
    def split(x):
        num = x.shape[0] // micro_size
        return jnp.swapaxes(x.reshape(micro_size, num, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, tree)


def completion_logprobs(model, tokens_BxL, attn_BxL, num_new: int, temperature: float):
    """(logp_BxN, entropy_BxN), float32, of the last N = `num_new` columns (the completion); the
    prompt columns cost no vocabulary work."""
    return models.sequence_logprobs(model, tokens_BxL, attn_BxL, temperature=temperature,
                                    num_completion=num_new)


def _rollout_policy_terms(logp_BxN, entropy_BxN, sampler_logp_BxN, mask_BxN):
    """Sums behind the rollout policy's `entropy` and `sampler_logprob_gap` (token means)."""
    return dict(entropy_sum=jnp.sum(entropy_BxN * mask_BxN),
                sampler_gap_sum=jnp.sum(jnp.abs(sampler_logp_BxN - logp_BxN) * mask_BxN))


def make_logprobs(graphdef, frozen, *, temperature: float, micro_batch_size: int, num_new: int):
    """Jittable (params, tokens [B, L], attn [B, L]) -> (logp [B, N], entropy [B, N]) of the
    completion columns, in micro-batches."""

    def logprobs(params, tokens_BxL, attn_BxL):
        model = nnx.merge(graphdef, params, frozen)
        size = micro_batch_size or tokens_BxL.shape[0]
        micro = _micro_batches((tokens_BxL, attn_BxL), size)
        fn = lambda mb: completion_logprobs(model, mb[0], mb[1], num_new, temperature)
        logp_MxbxN, entropy_MxbxN = jax.lax.map(fn, micro)
        unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(tokens_BxL.shape[0], num_new)
        return unsplit(logp_MxbxN), unsplit(entropy_MxbxN)

    return logprobs


def packed_completion_logprobs(model, packed, temperature: float):
    """(logp, entropy) [R, N], float32, of the packed completion layout of `packed` rows (keys
    tokens, segment, positions [R, W]; comp_col, mask [R, N]; see `pack_minibatch`)."""
    return models.packed_logprobs(model, packed["tokens"], packed["segment"], packed["positions"],
                                  packed["comp_col"], packed["mask"], temperature=temperature)


def make_packed_logprobs(graphdef, frozen, *, temperature: float, micro_batch_size: int):
    """Jittable (params, packed rows) -> (logp [R, N], entropy [R, N]) in micro-batches of
    `micro_batch_size` packed rows (0: all at once)."""

    def logprobs(params, packed):
        model = nnx.merge(graphdef, params, frozen)
        rows, width = packed["comp_col"].shape
        keys = ("tokens", "segment", "positions", "comp_col", "mask")
        micro = _micro_batches({k: packed[k] for k in keys}, micro_batch_size or rows)
        logp_MxbxN, entropy_MxbxN = jax.lax.map(
            lambda mb: packed_completion_logprobs(model, mb, temperature), micro)
        unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(rows, width)
        return unsplit(logp_MxbxN), unsplit(entropy_MxbxN)

    return logprobs


_PACKED_COMPLETION_KEYS = ("mask", "old_logp", "sampler_logp", "ref_logp")


def pack_minibatch(batch, plan):
    """Jittable: the packed minibatch of the rollout `batch` (see `make_update`) under `plan`
    (`packing.Plan`'s arrays on device, keys without their shape suffix): rows gathered on device.

    Returns tokens, segment, positions [R, W]; comp_col, comp_seq [R, N] and the completion
    arrays mask, old_logp / sampler_logp, ref_logp [R, N] (those the batch has); adv [S] of the
    S sequences in plan order."""
    packed = dict(tokens=packing.pack_rows(batch["tokens"], plan["token_src"]),
                  segment=plan["segment"], positions=plan["positions"],
                  comp_col=plan["comp_col"], comp_seq=plan["comp_seq"],
                  adv=jnp.take(batch["adv"], plan["rows"], axis=0))
    for key in _PACKED_COMPLETION_KEYS:
        if key in batch:
            packed[key] = packing.pack_completion(batch[key], plan["comp_src"], plan["comp_mask"])
    return packed


def plan_arrays(plan: packing.Plan, sharding_) -> dict:
    """A plan's index arrays uploaded with `sharding_` (the batch sharding), keys without their
    shape suffix."""
    arrays = {f.name.rsplit("_", 1)[0]: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    return {k: _upload(v, sharding_) for k, v in arrays.items()}


# ============================================================================ update step


def make_update(graphdef, tx, schedule, rl: ml_collections.ConfigDict, *,
                temperature: float, max_len: int, micro_batch_size: int):
    """The pure `update(state, frozen, batch) -> (state, metrics)` for one minibatch; `frozen` is
    the model state that is not trained (empty, or the frozen base with LoRA).

    batch: tokens [B, L] (prompt then completion), attn [B, L] (1 on real tokens), mask [B, N]
    (completion tokens incl. EOS), adv [B], ref_logp [B, N] when β > 0 and the KL is a loss term
    (not `rl.kl_in_reward`; the term is aggregated with `rl.agg`), and either old_logp
    [B, N] or — on policy, the one update of a rollout — sampler_logp [B, N], in which case the
    old logprobs are the current ones with a stopped gradient.

    A packed batch (`pack_minibatch`'s, told by its "segment" key) holds the per-token arrays in
    the packed completion layout [R, N] with their sequence ids, adv [S]; micro-batches are
    `micro_batch_size` packed rows, each seeing all S advantages (a sequence lies within one row).
    """
    loss_kwargs = dict(objective=rl.objective, eps=rl.eps, eps_high=rl.eps_high,
                       dual_clip=rl.dual_clip, level=rl.level, agg=rl.agg, max_len=max_len)
    kl_loss = rl.beta > 0 and not rl.kl_in_reward

    def micro_loss(params, frozen, mb, adv, denom):
        model = nnx.merge(graphdef, params, frozen)
        if "segment" in mb:  # packed
            logp_BxN, entropy_BxN = packed_completion_logprobs(model, mb, temperature)
            sequences = dict(sequence_ids=mb["comp_seq"], num_sequences=adv.shape[0])
            sequence_sums = losses.segment_sums(mb["comp_seq"], adv.shape[0])
        else:
            logp_BxN, entropy_BxN = completion_logprobs(model, mb["tokens"], mb["attn"],
                                                        mb["mask"].shape[1], temperature)
            sequences, sequence_sums = {}, losses.row_sums
        on_policy = "old_logp" not in mb
        old_logp_BxN = jax.lax.stop_gradient(logp_BxN) if on_policy else mb["old_logp"]
        terms = losses.policy_loss_terms(logp_BxN, old_logp_BxN, adv, mb["mask"],
                                         **loss_kwargs, **sequences)
        if on_policy:
            terms.update(_rollout_policy_terms(old_logp_BxN, jax.lax.stop_gradient(entropy_BxN),
                                               mb["sampler_logp"], mb["mask"]))
        loss = terms["loss_sum"] / denom
        if kl_loss:  # aggregated like the policy loss, so it shares its denominator
            terms.update(losses.kl_terms(logp_BxN, mb["ref_logp"], mb["mask"],
                                         estimator=rl.kl_estimator, agg=rl.agg, max_len=max_len,
                                         sequence_sums=sequence_sums))
            loss = loss + rl.beta * terms["kl_loss_sum"] / denom
        return loss, terms

    def update(state, frozen, batch):
        params = state["params"]
        packed = "segment" in batch
        mask = batch["mask"].astype(jnp.float32)
        # Denominators depend on masks only: compute them once for the whole minibatch.
        sequence_sums = (losses.segment_sums(batch["comp_seq"], batch["adv"].shape[0]) if packed
                         else losses.row_sums)
        _, denom = losses.lookup("agg", rl.agg)(mask, mask, max_len, sequence_sums)
        denom = jnp.maximum(denom, 1e-9)
        num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
        # Packed: every micro-batch sees all advantages (indexed by sequence id).
        rows = {k: v for k, v in batch.items() if not (packed and k == "adv")}
        micro = _micro_batches(rows, micro_batch_size or mask.shape[0])
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(grads_acc, mb):
            adv = batch["adv"] if packed else mb["adv"]
            (loss, terms), grads = grad_fn(params, frozen, mb, adv, denom)
            return jax.tree.map(jnp.add, grads_acc, grads), (loss, terms)

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        grads, (loss_M, terms_M) = jax.lax.scan(body, zero_grads, micro)
        terms = {k: v[0] for k, v in terms_M.items()}
        for j in range(1, loss_M.shape[0]):
            terms = losses.combine_terms(terms, {k: v[j] for k, v in terms_M.items()})
        loss = jnp.sum(loss_M)
        _, metrics = losses.finalize_terms(terms)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = dict(
            state,
            params=keep(new_params, params),
            opt_state=keep(new_opt_state, state["opt_state"]),
            updates=state["updates"] + finite.astype(jnp.int32),
            skipped_updates=state["skipped_updates"] + (~finite).astype(jnp.int32),
        )
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state["updates"]),
                       update_skipped=(~finite).astype(jnp.float32))
        if "entropy_sum" in terms:
            metrics["entropy"] = terms["entropy_sum"] / num_tokens
            metrics["sampler_logprob_gap"] = terms["sampler_gap_sum"] / num_tokens
        if kl_loss:
            metrics["kl_ref"] = terms["kl_sum"] / num_tokens
        return new_state, metrics

    return update


# ============================================================================ 1. build state


def init_state(params, tx, *, seed: int, beta: float, adapters: bool = False):
    """The step-0 training state around `params` (pure; `create_state` jits it with shardings).
    With `adapters` (LoRA) the reference policy is the base, so no reference copy is made."""
    state = dict(params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(seed),
                 step=jnp.int32(0), updates=jnp.int32(0), skipped_updates=jnp.int32(0))
    if beta > 0 and not adapters:
        # The frozen reference is the policy RL starts from (after any warm start). It lives in the
        # state so a resumed run gets it back from the checkpoint; β = 0 holds no reference.
        state["ref_params"] = jax.tree.map(jnp.copy, params)
    return state


def state_shardings(abstract_state, tx, param_sh, mesh):
    """Shardings of the state: params, reference and optimiser moments as the params; the rest
    (rng, counters, the optimiser's step counts) replicated."""
    replicated = NamedSharding(mesh, PS())
    is_sharding = lambda x: isinstance(x, NamedSharding)
    shardings = jax.tree.map(lambda _: replicated, abstract_state)
    shardings["params"] = param_sh
    shardings["opt_state"] = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_state["opt_state"], param_sh,
        transform_non_params=lambda _: replicated, is_leaf=is_sharding)
    if "ref_params" in abstract_state:
        shardings["ref_params"] = param_sh
    return shardings


def create_state(params, tx, mesh, *, seed: int, beta: float, adapters: bool = False):
    """(init, abstract_state): `init(params)` builds the step-0 state with every leaf born in its
    sharding (params donated); `abstract_state` holds ShapeDtypeStructs with those shardings, the
    target a checkpoint is restored into."""
    pure = functools.partial(init_state, tx=tx, seed=seed, beta=beta, adapters=adapters)
    abstract = jax.eval_shape(pure, params)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    shardings = state_shardings(abstract, tx, param_sh, mesh)
    init = jax.jit(pure, out_shardings=shardings, donate_argnums=0)
    return init, checkpoint.abstract_like(abstract, shardings)


def _make_mesh(config, devices):
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    rl = config.rl
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = rl.micro_batch_size or config.data.batch_size * rl.group_size // rl.num_minibatches
    if micro % batch_shards:
        raise ValueError(
            f"the micro-batch of {micro} sequences (rl.micro_batch_size, or data.batch_size × "
            f"rl.group_size / rl.num_minibatches) must divide over the {batch_shards} "
            f"data × fsdp shards of the mesh {dict(mesh.shape)}"
        )
    return mesh


def _build_tiny(config, workdir):
    """Process 0 writes the tiny model; the others wait for it, and write their own copy only
    where they do not see the workdir's (no shared file system)."""
    path = os.path.join(workdir, "tiny_model")
    build = lambda: tiny.build(path, seed=config.seed, **config.model.tiny.to_dict())
    if jax.process_index() == 0:
        build()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tiny_model written")
        build()  # returns at once where process 0's copy is visible
    return path


def _load_policy(config, workdir, mesh):
    """(model, tokenizer, eos_ids, pad_id, model_path) with the parameters placed in their
    shardings; with `config.lora.rank` > 0 the model carries fresh adapters on a base of
    `config.lora.base_dtype`."""
    model_path = config.model.path
    if model_path == "tiny":
        model_path = _build_tiny(config, workdir)
    model = models.from_pretrained(model_path, mesh=mesh,
                                   param_dtype=config.lora.base_dtype or config.model.param_dtype,
                                   dtype=config.model.dtype, remat=config.model.remat,
                                   remat_policy=config.model.remat_policy,
                                   attention=config.model.attention,
                                   unroll_layers=config.model.unroll_layers)
    tokenizer = models.load_tokenizer(model_path)
    eos_ids = models.eos_token_ids(model_path, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if config.lora.rank:
        model = lora.adapt(model, rank=config.lora.rank, alpha=config.lora.alpha,
                           targets=config.lora.targets, seed=config.seed, mesh=mesh)
    return model, tokenizer, eos_ids, pad_id, model_path


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the stages need that stays fixed for the whole run: the mesh, the policy's graph,
    tokenizer and reward scorer, and the jitted functions (compiled on first use)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    frozen: nnx.State  # the model state not trained: empty, or the frozen base with LoRA
    model_path: str  # the (base) model's checkpoint directory or hub id
    base_model: dict | None  # `lora.base_fingerprint` of the base with LoRA, else None
    tokenizer: object
    eos_ids: tuple[int, ...]
    pad_id: int
    scorer: rewards.Scorer
    split_rng: object  # rng → (next rng, sampler key)
    prepare: object  # (params, ref_params, frozen, samples, rewards[, plan]) → (rollout batch, metrics)
    shuffle: object  # (rollout batch, row order) → num_minibatches minibatches
    pack: object  # (rollout batch, plan) → packed minibatch (`pack_minibatch`)
    update: object  # (state, frozen, minibatch) → (state, metrics); state donated
    finish_step: object  # (state, rng) → state of the next step; state donated
    env: envs.EnvRollout | None = None  # multi-turn episodes (config.env); None: single-turn
    # (function, (R, W, N)) of every learner shape run so far — packed, or "update unpacked" /
    # "prepare unpacked" where packing saved no row: what the learner compiled for.
    learner_shapes: set = dataclasses.field(default_factory=set)
    # (rows run, unpacked rows) of each plan since the loop last read it: `packed_rows_frac`.
    planned_rows: list = dataclasses.field(default_factory=list)

    def plan(self, lengths_Bx2, rows_S, kind: str, *, prompt_width: int, completion_width: int):
        """The packing of rollout rows `rows_S` (host lengths [B, 2]: prompt, completion tokens;
        the rollout rows are `prompt_width` + `completion_width` columns), uploaded; `kind`
        ("prepare" or "update") names the function it feeds in `learner_shapes`. Row counts are
        multiples of the micro-batch (or of the batch shards). None when the packed rows would
        be as many as the unpacked ones: then the unpacked layout is cheaper (no gathers)."""
        rl = self.config.rl
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        granule = rl.micro_batch_size or shards
        max_rows = -(-len(rows_S) // granule) * granule
        plan = packing.plan(lengths_Bx2[:, 0], lengths_Bx2[:, 1], rows_S,
                            prompt_width=prompt_width, completion_width=completion_width,
                            granule=granule, max_rows=max_rows)
        if not packing.saves_rows(plan, len(rows_S)):
            self.learner_shapes.add((f"{kind} unpacked", (len(rows_S), *plan.shape[1:])))
            self.planned_rows.append((len(rows_S), len(rows_S)))
            return None
        self.learner_shapes.add((kind, plan.shape))
        self.planned_rows.append((plan.shape[0], len(rows_S)))
        return plan_arrays(plan, sharding.batch_sharding(self.mesh))


def make_programs(config, mesh, graphdef, *, pad_id: int, tx, schedule, state_sh, frozen_sh) -> dict:
    """The jitted device programs of a step with their shardings (`state_sh`, `frozen_sh`: those
    of the state and of the frozen model state): split_rng, prepare, shuffle, update, finish_step
    (see `Setup`). `cfpo_jax.aot` compiles these same programs for compile-only devices."""
    rl, sampling_config = config.rl, config.sampling
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PS())
    update = make_update(graphdef, tx, schedule, rl, temperature=sampling_config.temperature,
                         max_len=sampling_config.max_new_tokens,
                         micro_batch_size=rl.micro_batch_size)
    prepare = make_prepare(graphdef, rl, temperature=sampling_config.temperature, pad_id=pad_id,
                           on_policy=is_on_policy(rl), batch_sh=batch_sh, adapters=config.lora.rank > 0)
    return dict(
        split_rng=jax.jit(lambda key: tuple(jax.random.split(key)), out_shardings=replicated),
        prepare=jax.jit(prepare, out_shardings=(batch_sh, replicated)),
        shuffle=jax.jit(make_shuffle(rl.num_minibatches), out_shardings=batch_sh),
        pack=jax.jit(pack_minibatch, out_shardings=batch_sh),
        update=jax.jit(update, in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=(state_sh, replicated), donate_argnums=0),
        finish_step=jax.jit(lambda state, rng: dict(state, rng=rng, step=state["step"] + 1),
                            out_shardings=state_sh, donate_argnums=0),
    )


def make_setup(config, mesh, graphdef, frozen, tokenizer, eos_ids, pad_id, *, tx, schedule,
               state_sh, model_path: str = "", base_model: dict | None = None) -> Setup:
    """The jitted stage functions with their shardings (`state_sh`: the state's shardings)."""
    programs = make_programs(config, mesh, graphdef, pad_id=pad_id, tx=tx, schedule=schedule,
                             state_sh=state_sh, frozen_sh=jax.tree.map(lambda x: x.sharding, frozen))
    return Setup(
        config=config, mesh=mesh, graphdef=graphdef, frozen=frozen, model_path=model_path,
        base_model=base_model, tokenizer=tokenizer, eos_ids=tuple(eos_ids), pad_id=pad_id,
        scorer=rewards.Scorer.from_config(config.rewards, mesh=mesh),
        env=envs.EnvRollout.from_config(config, tokenizer, eos_ids), **programs)


def build(config, workdir: str, *, devices, ckpt: checkpoint.Checkpointer, progress):
    """Stage 1: (setup, state, data iterator) — the state restored from `ckpt`'s latest
    checkpoint when there is one, else fresh (after the warm start when configured)."""
    mesh = _make_mesh(config, devices)
    # The warm start's programs, like every later one, are traced with the mesh in context.
    with jax.set_mesh(mesh):
        return _build(config, workdir, mesh, ckpt, progress)


def _build(config, workdir, mesh, ckpt, progress):
    model, tokenizer, eos_ids, pad_id, model_path = _load_policy(config, workdir, mesh)
    adapters = config.lora.rank > 0
    # With LoRA the adapters train and the base is `frozen`; otherwise every parameter trains.
    graphdef, params, frozen = lora.split(model) if adapters else nnx.split(model, nnx.Param, ...)
    base_model = lora.base_fingerprint(model_path) if adapters else None
    del model  # `params` is donated to the state below
    iterator = data.iterator_from_config(config, tokenizer, tools=envs.prompt_tools(config.env))
    iterator.dataset[0]  # a row without the preset's fields fails now, not after compilation

    rl = config.rl
    tx, schedule = make_optimizer(config.optim,
                                  config.train.num_steps * rl.num_epochs * rl.num_minibatches)
    init, abstract_state = create_state(params, tx, mesh, seed=config.seed, beta=rl.beta,
                                        adapters=adapters)
    # The newest checkpoint that restores intact (damaged ones are set aside with a warning).
    restored = ckpt.restore_latest(abstract_state)
    if restored is not None:
        latest, state, meta = restored
        if meta.get("base_model") != base_model:
            raise ValueError(
                f"checkpoint {ckpt.directory}/{latest} holds adapters trained on the base model "
                f"{meta.get('base_model')}, but this run's base model is {base_model}")
        iterator.restore(meta["data"])
        progress.message(f"resumed from step {latest} ({ckpt.directory}/{latest})")
    else:
        if config.warmstart.steps:
            params = warmstart.run(params, graphdef, frozen, config=config, train_iterator=iterator,
                                   tokenizer=tokenizer, batch_sharding=sharding.batch_sharding(mesh),
                                   progress=progress)
        state = init(params)
    state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
    setup = make_setup(config, mesh, graphdef, frozen, tokenizer, eos_ids, pad_id, tx=tx,
                       schedule=schedule, state_sh=state_sh, model_path=model_path,
                       base_model=base_model)
    return setup, state, iterator


# ============================================================================ 2. rollout


def _upload(x, sharding_):
    """Host numpy → a global array with `sharding_` (every host holds the full value): an
    explicit transfer, allowed under the trainer's transfer guard."""
    x = np.asarray(x)
    with jax.transfer_guard_host_to_device("allow"):
        return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def is_on_policy(rl) -> bool:
    """One update per rollout (μ = 1, one minibatch): the sampler's logprobs are the old policy's,
    and the rollout needs no old-logprob forward."""
    return rl.num_epochs == 1 and rl.num_minibatches == 1


def prepare_runs_model(rl) -> bool:
    """Whether `make_prepare`'s pass runs the model at all: for the old logprobs (off policy) or
    the reference's (β > 0). Only then is a packing plan worth making for it."""
    return not is_on_policy(rl) or rl.beta > 0


def make_prepare(graphdef, rl, *, temperature: float, pad_id: int, on_policy: bool,
                 batch_sh, adapters: bool = False):
    """Jittable (params, ref_params, frozen, samples, reward_B) → (rollout batch, metrics): the
    device half of a rollout. The prompt columns are left-padded to a `data.bucket_width` so that
    the learner compiles for few prompt widths; advantages come from the rewards on device, after
    β·Σ_t KL_t is subtracted from each response's reward when `rl.kl_in_reward` (then the batch
    carries no reference logprobs: the update has no KL term). With `adapters` (LoRA) the
    reference is the policy with its adapters disabled, i.e. the base, and `ref_params` is unused.
    Given a `plan` (`Setup.plan` of all rows, in order; with `rl.pack`) the old and reference
    logprob passes run on the rollout packed by it and are unpacked back to [B, N]."""

    def prepare(params, ref_params, frozen, samples, reward_B, plan=None):
        width_p = data.bucket_width(samples.prompt_tokens.shape[1])
        pad = ((0, 0), (width_p - samples.prompt_tokens.shape[1], 0))
        tokens_BxL = jnp.concatenate(
            [jnp.pad(samples.prompt_tokens, pad, constant_values=pad_id), samples.tokens], axis=1)
        attn_BxL = jnp.concatenate([jnp.pad(samples.prompt_mask, pad), samples.mask], axis=1)
        tokens_BxL, attn_BxL = (jax.lax.with_sharding_constraint(x, batch_sh)
                                for x in (tokens_BxL, attn_BxL))
        # The loss mask: the tokens the policy sampled (in an episode, not the answers).
        mask_BxN = samples.loss_mask.astype(jnp.float32)
        num_tokens = jnp.maximum(jnp.sum(mask_BxN), 1.0)
        batch = dict(tokens=tokens_BxL, attn=attn_BxL, mask=mask_BxN)
        metrics = dict(truncated_frac=1.0 - jnp.mean(samples.eos.astype(jnp.float32)))
        if plan is not None:
            packed_logprobs = make_packed_logprobs(graphdef, frozen, temperature=temperature,
                                                   micro_batch_size=rl.micro_batch_size)
            rows = dict(tokens=packing.pack_rows(tokens_BxL, plan["token_src"]),
                        segment=plan["segment"], positions=plan["positions"],
                        comp_col=plan["comp_col"], mask=plan["comp_mask"])

            def logprobs(params, tokens_BxL, attn_BxL):
                del tokens_BxL, attn_BxL  # packed in `rows`
                return tuple(packing.unpack_completion(x_RxN, plan["unpack"], mask_BxN)
                             for x_RxN in packed_logprobs(params, rows))
        else:
            logprobs = make_logprobs(graphdef, frozen, temperature=temperature,
                                     micro_batch_size=rl.micro_batch_size,
                                     num_new=samples.tokens.shape[1])
        policy_logp_BxN = None
        if on_policy:
            batch["sampler_logp"] = samples.logprobs
        else:
            batch["old_logp"], entropy_BxN = logprobs(params, tokens_BxL, attn_BxL)
            policy_logp_BxN = batch["old_logp"]
            terms = _rollout_policy_terms(batch["old_logp"], entropy_BxN, samples.logprobs, mask_BxN)
            metrics.update(entropy=terms["entropy_sum"] / num_tokens,
                           sampler_logprob_gap=terms["sampler_gap_sum"] / num_tokens)
        if rl.beta > 0:
            reference = lora.disabled(params) if adapters else ref_params
            ref_logp_BxN = logprobs(reference, tokens_BxL, attn_BxL)[0]
        if rl.beta > 0 and rl.kl_in_reward:
            # The KL of the policy that sampled (the trainer's logprobs; on policy the update
            # needs none, so this is the one forward it costs) becomes part of the reward.
            if policy_logp_BxN is None:
                policy_logp_BxN = logprobs(params, tokens_BxL, attn_BxL)[0]
            kl_B = losses.sequence_kl(policy_logp_BxN, ref_logp_BxN, mask_BxN, rl.kl_estimator)
            reward_B = reward_B - rl.beta * kl_B
            metrics.update(kl_ref=jnp.sum(kl_B) / num_tokens, kl_penalty=rl.beta * jnp.mean(kl_B))
        elif rl.beta > 0:
            batch["ref_logp"] = ref_logp_BxN
        batch["adv"] = advantages.compute(reward_B, rl.group_size, rl.estimator,
                                          lengths=jnp.sum(mask_BxN, axis=1))
        return batch, metrics

    return prepare


def prepare_batch(setup: Setup, state, samples: sampling.Samples, reward_B, lengths_Bx2):
    """The rollout batch (see `rollout`) of scored `samples`: rewards (host [B]) up, then
    `Setup.prepare` on device (packed by a plan of all rows with `rl.pack`). `lengths_Bx2`: the
    prompt and completion tokens of each row (host)."""
    lengths_Bx2 = np.asarray(lengths_Bx2, np.int32)
    with jax.transfer_guard("disallow"):
        reward_B = _upload(np.asarray(reward_B, np.float32), NamedSharding(setup.mesh, PS()))
        plan = None
        if setup.config.rl.pack and prepare_runs_model(setup.config.rl):
            plan = setup.plan(lengths_Bx2, np.arange(len(lengths_Bx2)), "prepare",
                              prompt_width=data.bucket_width(samples.prompt_tokens.shape[1]),
                              completion_width=samples.tokens.shape[1])
        batch, device_metrics = setup.prepare(state["params"], state.get("ref_params"),
                                              setup.frozen, samples, reward_B,
                                              **({} if plan is None else dict(plan=plan)))
    batch["lengths"] = lengths_Bx2
    return batch, device_metrics


def rollout(setup: Setup, state, prompts: data.Batch, sample_key):
    """sample → completion text → rewards → advantages, old / reference logprobs.

    Returns (batch, host_metrics, device_metrics, times): `batch` the rollout on device (see
    `make_update`) and, under "lengths", int32 [B, 2] on the host: the prompt and completion
    tokens of each row, what `learn` plans packed minibatches from (no jitted function sees it);
    `device_metrics` scalars still on device (fetched once per step).
    """
    config = setup.config
    rl, sampling_config = config.rl, config.sampling
    t0 = time.time()
    policy = nnx.merge(setup.graphdef, state["params"], setup.frozen)
    if config.lora.rank and config.lora.merge_for_sampling:
        policy = lora.merge(policy)
    sample_kwargs = dict(
        max_new_tokens=sampling_config.max_new_tokens, temperature=sampling_config.temperature,
        top_p=sampling_config.top_p, top_k=sampling_config.top_k, seed=sample_key,
        n=rl.group_size, pad_id=setup.pad_id, mesh=setup.mesh,
        **sampling.engine_settings(sampling_config))
    if setup.env is None:
        samples = sampling.generate(policy, prompts.prompts, eos_token_ids=setup.eos_ids, **sample_kwargs)
        env_metrics = {}
    else:  # multi-turn episodes: the completion is the whole episode after the prompt
        samples, env_metrics = setup.env.generate(policy, prompts.examples, prompts.prompts,
                                                  **sample_kwargs)
    # The completion text is all the host needs from the samples.
    tokens_BxN, lengths_B = sharding.to_host((samples.tokens, samples.lengths))
    t1 = time.time()

    completions = setup.tokenizer.batch_decode(
        [row[:n] for row, n in zip(tokens_BxN, lengths_B)], skip_special_tokens=True)
    answers, fields = prompts.reward_inputs(rl.group_size)
    # The conversation each completion answers, for reward models to write in their own template.
    messages = [data.chat_messages(e["question"], config.data.system_prompt or None,
                                   config.data.user_template)
                for e in prompts.examples for _ in range(rl.group_size)]
    scores = setup.scorer(completions, answers, prompt_messages=messages, **fields)
    t2 = time.time()

    prompt_lengths = np.repeat([len(p) for p in prompts.prompts], rl.group_size)
    batch, device_metrics = prepare_batch(setup, state, samples, scores.total_B,
                                          np.stack([prompt_lengths, lengths_B], axis=1))
    groups = scores.total_B.reshape(-1, rl.group_size)
    host_metrics = dict(
        **scores.metrics("reward"),
        response_len_mean=float(lengths_B.mean()),
        response_len_max=int(lengths_B.max()),
        **verbosity_metrics(scores.total_B, lengths_B, rl.group_size),
        zero_std_groups=int((np.ptp(groups, axis=1) == 0).sum()),
        tokens_per_s=float(lengths_B.sum()) / max(t1 - t0, 1e-9),
        **env_metrics,
    )
    return batch, host_metrics, device_metrics, dict(time_sample_s=t1 - t0, time_score_s=t2 - t1)


# ============================================================================ 3. learn


def minibatch_order(seed: int, step: int, epoch: int, rows: int) -> np.ndarray:
    """The permutation of the rollout's rows for (seed, step, epoch), int32 [rows] (host)."""
    return np.random.default_rng([seed, step, epoch]).permutation(rows).astype(np.int32)


def make_shuffle(num_minibatches: int):
    """Jittable (batch, order) → `num_minibatches` minibatches: the rows in `order`, split."""

    def shuffle(batch, order):
        size = order.shape[0] // num_minibatches
        return [jax.tree.map(lambda x: x[order[i * size:(i + 1) * size]], batch)
                for i in range(num_minibatches)]

    return shuffle


def learn(setup: Setup, state, batch, step: int):
    """num_epochs passes over the rollout `batch` of RL step `step`, each in num_minibatches
    updates (a fresh permutation of the rows per epoch; packed per minibatch with `rl.pack`).
    Returns (state, [metrics of each update], on device)."""
    rl = setup.config.rl
    lengths_Bx2 = batch["lengths"]
    batch = {k: v for k, v in batch.items() if k != "lengths"}
    rows = len(lengths_Bx2)
    size = rows // rl.num_minibatches
    widths = dict(prompt_width=batch["tokens"].shape[1] - batch["mask"].shape[1],
                  completion_width=batch["mask"].shape[1])
    update_metrics = []

    def unpacked(order):
        if rl.num_minibatches == 1:
            return [batch]
        return setup.shuffle(batch, _upload(order, NamedSharding(setup.mesh, PS())))

    def packed(order):  # each minibatch packed, or unpacked where packing saves no row
        padded = None
        for i in range(rl.num_minibatches):
            plan = setup.plan(lengths_Bx2, order[i * size:(i + 1) * size], "update", **widths)
            if plan is not None:
                yield setup.pack(batch, plan)
                continue
            padded = unpacked(order) if padded is None else padded
            yield padded[i]

    for epoch in range(rl.num_epochs):
        order = (np.arange(rows, dtype=np.int32) if rl.num_minibatches == 1
                 else minibatch_order(setup.config.seed, step, epoch, rows))
        for minibatch in (packed(order) if rl.pack else unpacked(order)):
            state, metrics = setup.update(state, setup.frozen, minibatch)
            update_metrics.append(metrics)
    return state, update_metrics


# ============================================================================ 4. log, checkpoint, evaluate


def _mean_metrics(metrics_list):
    out = {}
    for key in metrics_list[0]:
        values = np.array([m[key] for m in metrics_list], np.float64)
        out[key] = values.max() if key == "ratio_max" else values.min() if key == "ratio_min" \
            else values.mean()
    return {k: float(v) for k, v in out.items()}


def verbosity_metrics(reward_B, lengths_B, group_size: int) -> dict[str, float]:
    """Length diagnostics of one rollout (the paper's verbosity exploitation: responses that grow
    with the reward). `reward_B` is the reward functions' total, before any KL penalty.

    response_len_p90: 90th percentile of response lengths (tokens, linear interpolation).
    reward_len_corr: Pearson correlation of reward and length within groups: both centred on
      their group's mean, then pooled over the batch, so that prompts with longer answers and
      higher rewards do not make a correlation of their own; 0 when either has no spread.
    reward_per_token: Σ reward / Σ length over the batch.
    """
    reward_NxG = np.asarray(reward_B, np.float64).reshape(-1, group_size)
    length_NxG = np.asarray(lengths_B, np.float64).reshape(-1, group_size)
    reward_dev = reward_NxG - reward_NxG.mean(axis=1, keepdims=True)
    length_dev = length_NxG - length_NxG.mean(axis=1, keepdims=True)
    scale = np.sqrt(np.sum(reward_dev**2) * np.sum(length_dev**2))
    return dict(
        response_len_p90=float(np.percentile(length_NxG, 90)),
        reward_len_corr=float(np.sum(reward_dev * length_dev) / scale) if scale > 0 else 0.0,
        reward_per_token=float(np.sum(reward_NxG) / max(np.sum(length_NxG), 1.0)),
    )


def step_metrics(host_metrics, device_metrics, update_metrics, state):
    """All of one step's metrics on the host: one fetch of the device scalars."""
    device_metrics, update_metrics, skipped = jax.device_get(
        (device_metrics, update_metrics, state["skipped_updates"]))
    return dict(**host_metrics, **_mean_metrics(update_metrics),
                **{k: float(v) for k, v in device_metrics.items()}, skipped_updates=int(skipped))


def _evaluate(config, workdir, model, tokenizer, mesh, eos_ids, step, writer, progress):
    results = evaluate.evaluate_model(
        model, tokenizer, config, output_dir=config.eval.output_dir or os.path.join(workdir, "eval"),
        step=step, mesh=mesh, eos_token_ids=eos_ids, progress=progress.tty)
    writer.write(step, {f"eval/{k}": v for k, v in results.items()})
    shown = (f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items())
    progress.message(f"eval @ {step}: " + "  ".join(shown))


# ============================================================================ signals


class _StopFlag:
    """SIGTERM / SIGINT → finish the current step, checkpoint, exit 0. A second signal acts as usual."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ============================================================================ the run


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Trains per `config` into `workdir`; returns {'state', 'history', 'stopped_by'}.

    `devices` restricts the mesh (tests compare 1 device with 8); default all devices.
    """
    config_lib.validate(config)
    sharding.initialize_distributed(config.mesh)  # before any other JAX call
    stop = _StopFlag().install()
    try:
        return _run(config, workdir, devices, stop)
    finally:
        stop.restore()


def _run(config, workdir, devices, stop):
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    num_steps = config.train.num_steps
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   every=config.train.checkpoint_every,
                                   keep=config.train.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.train.tensorboard,
                                       wandb_project=config.train.wandb_project,
                                       config=config.to_dict(), enabled=is_main)
    progress = metrics_lib.Progress(num_steps, every=config.train.log_every, enabled=is_main)
    setup, state, iterator = build(config, workdir, devices=devices, ckpt=ckpt,
                                   progress=progress)
    # Every program of the run (update, logprob passes, sampler, reward model, evaluation) is
    # traced with the mesh in context: attention runs the kernel of the mesh's platform, per shard
    # (`models.attention`).
    with jax.set_mesh(setup.mesh):
        return _loop(config, workdir, setup, state, iterator, ckpt, writer, progress, stop)


def _loop(config, workdir, setup, state, iterator, ckpt, writer, progress, stop):
    num_steps = config.train.num_steps
    policy = lambda: nnx.merge(setup.graphdef, state["params"], setup.frozen)
    meta = lambda: {"data": iterator.state, "base_model": setup.base_model}

    history = []
    step = int(jax.device_get(state["step"]))
    if config.eval.sources and config.eval.at_start and step == 0:
        _evaluate(config, workdir, policy(), setup.tokenizer, setup.mesh, setup.eos_ids, step,
                  writer, progress)
    # Stopping changes the collective program (a checkpoint now, no next step), so the processes
    # decide together: after each step, a stop signal to any process stops all of them.
    stopping = sharding.any_process(stop.signal is not None)
    while step < num_steps and not stopping:
        t0 = time.time()
        next_rng, sample_key = setup.split_rng(state["rng"])
        batch, host_metrics, device_metrics, times = rollout(setup, state, next(iterator),
                                                             sample_key)
        t_learn = time.time()
        with jax.transfer_guard("disallow"):
            state, update_metrics = learn(setup, state, batch, step)
            state = setup.finish_step(state, next_rng)
        metrics = step_metrics(host_metrics, device_metrics, update_metrics, state)
        if config.rl.pack:  # how many learner shapes (packed or not) have compiled so far, and
            # the rows the learner ran this step over the unpacked rows (1: packing saved none)
            metrics["learner_shapes"] = len(setup.learner_shapes)
            ran, unpacked = np.sum(setup.planned_rows, axis=0)
            metrics["packed_rows_frac"] = float(ran / unpacked)
            setup.planned_rows.clear()
        step += 1
        metrics.update(times, time_learn_s=time.time() - t_learn, time_step_s=time.time() - t0)
        writer.write(step, metrics)
        progress.update(step, metrics)
        history.append(dict(step=step, **metrics))

        stopping = sharding.any_process(stop.signal is not None)
        if ckpt.save(step, state, meta(), force=stopping or step == num_steps):
            progress.message(f"checkpoint {step} -> {ckpt.directory}/{step}")
        every = config.eval.every_steps
        if config.eval.sources and ((every and step % every == 0) or step == num_steps):
            _evaluate(config, workdir, policy(), setup.tokenizer, setup.mesh, setup.eos_ids, step,
                      writer, progress)

    stopped_by = stop.signal or ("a stop signal to another process" if stopping else None)
    if stopped_by is not None:
        # A signal before the first RL step (during compilation or the warm start) still leaves a
        # checkpoint of what was done.
        ckpt.wait()
        if ckpt.latest_step() != step:
            ckpt.save(step, state, meta(), force=True)
        progress.message(f"{stopped_by}: saved step {step} and stopped")
    ckpt.close()
    if config.train.export_hf and step == num_steps and stopped_by is None:
        path = os.path.join(workdir, "hf")
        models.save_pretrained(lora.merge(policy()) if config.lora.rank else policy(), path,
                               tokenizer=setup.tokenizer)
        progress.message(f"exported the policy to {path}")
    if config.train.export_peft and step == num_steps and stopped_by is None:
        path = os.path.join(workdir, "peft")
        lora.save_peft(policy(), path, base_model_path=setup.model_path)
        progress.message(f"exported the adapters (PEFT) to {path}")
    writer.close()
    setup.scorer.close()
    if setup.env is not None:
        setup.env.close()
    return dict(state=state, history=history, stopped_by=stopped_by)


# ============================================================================ command line


def _parse_flags(argv):
    """absl flag parsing, with an unknown `--config.a.b` override reported with the valid names."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        message = str(e).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
        sys.stderr.write(f"error: {message}\n")
        for arg in argv:
            if arg.startswith("--config.") and "=" in arg:
                *sections, _ = arg[len("--config."):].split("=")[0].split(".")
                node = config_lib.base_config()
                for section in sections:
                    node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
                if isinstance(node, ml_collections.ConfigDict):
                    where = ".".join(sections) or "the top level"
                    sys.stderr.write(f"  valid fields of {where}: {sorted(node.keys())}\n")
        sys.exit(2)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or config.workdir
    if not workdir:
        sys.exit("error: no workdir: pass --workdir=DIR or set config.workdir")
    try:
        config_lib.validate(config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    result = run(config, workdir)
    history = result["history"]
    if history:
        tenth = max(len(history) // 10, 1)
        first = np.mean([h["reward_mean"] for h in history[:tenth]])
        last = np.mean([h["reward_mean"] for h in history[-tenth:]])
        print(f"done: mean reward first tenth {first:.3f} -> last tenth {last:.3f}; "
              f"metrics in {os.path.join(workdir, 'metrics.jsonl')}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
