"""The jitted programs of learning, over typed batches (`cfpo_jax.batch`), and the learn stage.

* `make_prepare`: the device half of a rollout — old logprobs (off policy), reference logprobs
  (β > 0), the KL folded into the reward (`rl.kl_in_reward`), advantages — into a `Batch`.
* `make_update`: the pure `update(state, frozen, minibatch) -> (state, metrics)`, built for one
  layout (unpacked `Batch` or `PackedBatch`).
* `make_programs`: every jitted program of a step with its shardings; `cfpo_jax.aot` compiles
  these same programs for compile-only devices.
* `Learner`: the programs of one run and the packing of its minibatches; `prepare` turns scored
  samples into the rollout batch, `learn` runs num_epochs × num_minibatches updates on it.

Decisions written down here:
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
    permutation (the lengths are host facts), uploads the plan, and the device gathers the packed
    minibatch from the rollout it holds. Losses and metrics run on the packed completion layout
    [R, N] with per-sequence sums by sequence id, so they equal the unpacked ones; the old and
    reference logprobs are unpacked back to [B, N] in the rollout.
  * The RLVR options of the loss (`cfpo_jax.losses`): entropy control (Clip-Cov draws its
    tokens with a key per micro-batch, `fold_in(state rng, updates)` split over the micro-batches,
    so a resumed run draws the same), the ratio's reference and the rollout correction (both
    read the sampler's logprobs, which the batch then carries: `batch.uses_sampler_logp`), and
    DAPO's overlong filter (`rl.overlong_filter`: the rollout batch's loss mask drops truncated
    rows after the advantages are computed, so they still count in their groups).
  * Mixture of experts: the update adds `rl.moe_aux_loss_coef` × the router load-balancing loss
    (mean over micro-batches; reported as `moe_aux_loss` for every MoE model). With
    `model.moe_routing="replay"` the rollout carries the sampler's routing (`Batch.routing`) and
    the old-logprob, reference and update passes run those experts; `prepare` then also runs the
    policy once without replay for `moe_routing_flip_frac` (tokens the learner routes differently
    from the sampler in some layer; `_layer`: per token and layer) and
    `moe_sampler_logprob_gap_recompute` (the sampler gap without replay, beside
    `sampler_logprob_gap` with it).
  * LoRA: `frozen` (the frozen base) is an argument of every jitted function (a closed-over array
    would be compiled in as a constant), never differentiated or donated. The reference policy for
    β > 0 is then the base, i.e. the policy with its adapters disabled (`lora.disabled`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from cfpo_jax import advantages, data, lora, losses, models, packing, sharding
from cfpo_jax.batch import Batch, PackedBatch, is_on_policy, uses_sampler_logp


def micro_batches(tree, micro_size: int):
    """[B, ...] leaves → [M, b, ...] with micro-batch j = rows {i·M + j}: each device keeps its rows."""
    def split(x):
        num = x.shape[0] // micro_size
        return jnp.swapaxes(x.reshape(micro_size, num, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, tree)


def completion_logprobs(model, tokens_BxL, attn_BxL, num_new: int, temperature: float, routing=None,
                        return_moe: bool = False):
    """(logp_BxN, entropy_BxN), float32, of the last N = `num_new` columns (the completion); the
    prompt columns cost no vocabulary work. A MoE model replays `routing` when given and, with
    `return_moe`, also returns its `models.moe.MoEStats`."""
    return models.sequence_logprobs(model, tokens_BxL, attn_BxL, temperature=temperature,
                                    num_completion=num_new, routing=routing, return_moe=return_moe)


def packed_completion_logprobs(model, packed: PackedBatch, temperature: float, return_moe: bool = False):
    """(logp, entropy) [R, N], float32, of the packed completion layout of `packed` rows (their
    routing replayed when they carry one; with `return_moe` also the `MoEStats`)."""
    return models.packed_logprobs(model, packed.tokens, packed.segment, packed.positions,
                                  packed.comp_col, packed.mask, temperature=temperature,
                                  routing=packed.routing, return_moe=return_moe)


def moe_replay_terms(experts_BxLxYxK, routing_BxLxYxK, attn_BxL, logp_BxN, sampler_logp_BxN, mask_BxN):
    """Sums behind the routing-replay metrics: the learner's own routing (no replay) against the
    sampler's recorded one, and the sampler gap of the logprobs computed without replay."""
    tokens = jnp.sum((attn_BxL != 0) & (routing_BxLxYxK[:, :, 0, 0] >= 0))
    token_frac, layer_frac = models.moe.routing_flips(experts_BxLxYxK, routing_BxLxYxK, attn_BxL)
    return dict(flip_sum=token_frac * tokens, flip_layer_sum=layer_frac * tokens, routed=tokens,
                gap_recompute_sum=jnp.sum(jnp.abs(sampler_logp_BxN - logp_BxN) * mask_BxN))


def rollout_policy_terms(logp_BxN, entropy_BxN, sampler_logp_BxN, mask_BxN):
    """Sums behind the rollout policy's `entropy` and `sampler_logprob_gap` (token means)."""
    return dict(entropy_sum=jnp.sum(entropy_BxN * mask_BxN),
                sampler_gap_sum=jnp.sum(jnp.abs(sampler_logp_BxN - logp_BxN) * mask_BxN))


def make_logprobs(graphdef, frozen, *, temperature: float, micro_batch_size: int, num_new: int):
    """Jittable (params, tokens [B, L], attn [B, L], routing=None, with_experts=False) -> (logp
    [B, N], entropy [B, N]) of the completion columns, in micro-batches; a MoE model replays
    `routing` [B, L, layers, k] when given, and with `with_experts` also returns its own experts
    [B, L, layers, k] third."""

    def logprobs(params, tokens_BxL, attn_BxL, routing=None, with_experts: bool = False):
        model = nnx.merge(graphdef, params, frozen)
        size = micro_batch_size or tokens_BxL.shape[0]
        micro = micro_batches((tokens_BxL, attn_BxL, routing), size)

        def fn(mb):
            tokens_bxL, attn_bxL, routing_bxLxYxK = mb
            out = completion_logprobs(model, tokens_bxL, attn_bxL, num_new, temperature,
                                      routing=routing_bxLxYxK, return_moe=with_experts)
            return (*out[:2], out[2].experts_BxTxLxK) if with_experts else out

        out = jax.lax.map(fn, micro)
        unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(tokens_BxL.shape[0], *x.shape[2:])
        return tuple(map(unsplit, out))

    return logprobs


def make_packed_logprobs(graphdef, frozen, *, temperature: float, micro_batch_size: int):
    """Jittable (params, packed rows) -> (logp [R, N], entropy [R, N]) in micro-batches of
    `micro_batch_size` packed rows (0: all at once). Only the row arrays are read (tokens,
    segment, positions, comp_col, mask); the advantages and logprobs may be None."""

    def logprobs(params, packed: PackedBatch):
        model = nnx.merge(graphdef, params, frozen)
        rows, width = packed.comp_col.shape
        row_arrays = PackedBatch(tokens=packed.tokens, segment=packed.segment,
                                 positions=packed.positions, comp_col=packed.comp_col,
                                 comp_seq=packed.comp_seq, mask=packed.mask, adv=None,
                                 routing=packed.routing)
        micro = micro_batches(row_arrays, micro_batch_size or rows)
        logp_MxbxN, entropy_MxbxN = jax.lax.map(
            lambda mb: packed_completion_logprobs(model, mb, temperature), micro)
        unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(rows, width)
        return unsplit(logp_MxbxN), unsplit(entropy_MxbxN)

    return logprobs


# ============================================================================ update


def make_update(graphdef, tx, schedule, rl: ml_collections.ConfigDict, *, temperature: float,
                max_len: int, micro_batch_size: int, packed: bool):
    """The pure `update(state, frozen, minibatch) -> (state, metrics)` for one minibatch of the
    layout `packed` chooses (`PackedBatch`, else `Batch`); `frozen` is the model state that is
    not trained (empty, or the frozen base with LoRA).

    The minibatch carries ref_logp when β > 0 and the KL is a loss term (aggregated with
    `rl.agg`), and either old_logp or — on policy, the one update of a rollout — sampler_logp,
    in which case the old logprobs are the current ones with a stopped gradient. Packed
    micro-batches are `micro_batch_size` packed rows, each seeing all S advantages (a sequence
    lies within one row).
    """
    loss_kwargs = dict(objective=rl.objective, eps=rl.eps, eps_high=rl.eps_high,
                       dual_clip=rl.dual_clip, level=rl.level, agg=rl.agg, max_len=max_len,
                       entropy_control=rl.entropy_control, clip_cov_ratio=rl.clip_cov_ratio,
                       clip_cov_lb=rl.clip_cov_lb, clip_cov_ub=rl.clip_cov_ub,
                       kl_cov_ratio=rl.kl_cov_ratio, kl_cov_coef=rl.kl_cov_coef,
                       ratio_reference=rl.ratio_reference,
                       rollout_correction=rl.rollout_correction,
                       rollout_correction_cap=rl.rollout_correction_cap)
    kl_loss = rl.beta > 0 and not rl.kl_in_reward
    on_policy = is_on_policy(rl)
    behaviour = uses_sampler_logp(rl)
    draws = rl.entropy_control == "clip_cov"  # Clip-Cov picks its tokens at random
    layout = PackedBatch if packed else Batch

    def micro_loss(params, frozen, mb, adv, denom, num_micro, key):
        model = nnx.merge(graphdef, params, frozen)
        moe = model.config.num_experts > 0  # MoE models report their load-balancing loss
        if packed:
            logp_BxN, entropy_BxN, *moe_stats = packed_completion_logprobs(model, mb, temperature,
                                                                           return_moe=moe)
            sequences = dict(sequence_ids=mb.comp_seq, num_sequences=adv.shape[0])
            sequence_sums = losses.segment_sums(mb.comp_seq, adv.shape[0])
        else:
            logp_BxN, entropy_BxN, *moe_stats = completion_logprobs(
                model, mb.tokens, mb.attn, mb.mask.shape[1], temperature, routing=mb.routing,
                return_moe=moe)
            sequences, sequence_sums = {}, losses.row_sums
        old_logp_BxN = jax.lax.stop_gradient(logp_BxN) if on_policy else mb.old_logp
        terms = losses.policy_loss_terms(
            logp_BxN, old_logp_BxN, adv, mb.mask, **loss_kwargs, **sequences,
            behaviour_logp=mb.sampler_logp if behaviour else None, rng=key if draws else None)
        if on_policy:
            terms.update(rollout_policy_terms(old_logp_BxN, jax.lax.stop_gradient(entropy_BxN),
                                              mb.sampler_logp, mb.mask))
        loss = terms["loss_sum"] / denom
        if moe:  # transformers' definition per micro-batch; their mean enters the loss
            terms["moe_aux_loss_sum"] = moe_stats[0].aux_loss
            loss = loss + rl.moe_aux_loss_coef * moe_stats[0].aux_loss / num_micro
        if kl_loss:  # aggregated like the policy loss, so it shares its denominator
            terms.update(losses.kl_terms(logp_BxN, mb.ref_logp, mb.mask,
                                         estimator=rl.kl_estimator, agg=rl.agg, max_len=max_len,
                                         sequence_sums=sequence_sums))
            loss = loss + rl.beta * terms["kl_loss_sum"] / denom
        return loss, terms

    def update(state, frozen, batch):
        if not isinstance(batch, layout):
            raise TypeError(f"this update was built for {layout.__name__}; got {type(batch).__name__}")
        params = state["params"]
        mask = batch.mask.astype(jnp.float32)
        # Denominators depend on masks only: compute them once for the whole minibatch.
        sequence_sums = (losses.segment_sums(batch.comp_seq, batch.adv.shape[0]) if packed
                         else losses.row_sums)
        _, denom = losses.lookup("agg", rl.agg)(mask, mask, max_len, sequence_sums)
        denom = jnp.maximum(denom, 1e-9)
        num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
        # Packed: every micro-batch sees all advantages (indexed by sequence id).
        rows = dataclasses.replace(batch, adv=None) if packed else batch
        micro_size = micro_batch_size or mask.shape[0]
        micro = micro_batches(rows, micro_size)
        num_micro = mask.shape[0] // micro_size
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        # One key per micro-batch of this update (the step's rng is new each step, `updates`
        # counts the updates): the same draws on a resumed run.
        keys = (jax.random.split(jax.random.fold_in(state["rng"], state["updates"]),
                                 jax.tree.leaves(micro)[0].shape[0]) if draws else None)

        def body(grads_acc, mb_key):
            mb, key = mb_key
            adv = batch.adv if packed else mb.adv
            (loss, terms), grads = grad_fn(params, frozen, mb, adv, denom, num_micro, key)
            return jax.tree.map(jnp.add, grads_acc, grads), (loss, terms)

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        grads, (loss_M, terms_M) = jax.lax.scan(body, zero_grads, (micro, keys))
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
        if on_policy:
            metrics["entropy"] = terms["entropy_sum"] / num_tokens
            metrics["sampler_logprob_gap"] = terms["sampler_gap_sum"] / num_tokens
        if kl_loss:
            metrics["kl_ref"] = terms["kl_sum"] / num_tokens
        if "moe_aux_loss_sum" in terms:
            metrics["moe_aux_loss"] = terms["moe_aux_loss_sum"] / num_micro
        return new_state, metrics

    return update


# ============================================================================ prepare


def prepare_runs_model(rl) -> bool:
    """Whether `make_prepare`'s pass runs the model at all: for the old logprobs (off policy) or
    the reference's (β > 0). Only then is a packing plan worth making for it."""
    return not is_on_policy(rl) or rl.beta > 0


def make_prepare(graphdef, rl, *, temperature: float, pad_id: int, batch_sh, adapters: bool = False,
                 replay: bool = False):
    """Jittable (params, ref_params, frozen, samples, reward_B, plan) → (rollout `Batch`,
    metrics): the device half of a rollout. The prompt columns are left-padded to a
    `data.bucket_width` so that the learner compiles for few prompt widths; advantages come from
    the rewards on device, after β·Σ_t KL_t is subtracted from each response's reward when
    `rl.kl_in_reward` (then the batch carries no reference logprobs: the update has no KL term).
    With `adapters` (LoRA) the reference is the policy with its adapters disabled, i.e. the base,
    and `ref_params` is unused. Given a `plan` (`packing.Plan` of all rows, in order; with
    `rl.pack`) the old and reference logprob passes run on the rollout packed by it and are
    unpacked back to [B, N]; None runs them unpacked. With `replay` (a MoE policy, routing
    recorded by the sampler in `samples.routing`) the passes replay it, the batch carries it, and
    one more forward without replay gives the routing-replay metrics."""
    on_policy = is_on_policy(rl)
    keep_sampler_logp = on_policy or uses_sampler_logp(rl)

    def prepare(params, ref_params, frozen, samples, reward_B, plan: packing.Plan | None):
        width_p = data.bucket_width(samples.prompt_tokens.shape[1])
        pad = ((0, 0), (width_p - samples.prompt_tokens.shape[1], 0))
        tokens_BxL = jnp.concatenate(
            [jnp.pad(samples.prompt_tokens, pad, constant_values=pad_id), samples.tokens], axis=1)
        attn_BxL = jnp.concatenate([jnp.pad(samples.prompt_mask, pad), samples.mask], axis=1)
        tokens_BxL, attn_BxL = (jax.lax.with_sharding_constraint(x, batch_sh)
                                for x in (tokens_BxL, attn_BxL))
        routing = None
        if replay:
            routing = jax.lax.with_sharding_constraint(
                jnp.pad(samples.routing, (pad[0], (pad[1][0], 0), (0, 0), (0, 0)), constant_values=-1), batch_sh)
        # The loss mask: the tokens the policy sampled (in an episode, not the answers).
        mask_BxN = samples.loss_mask.astype(jnp.float32)
        num_tokens = jnp.maximum(jnp.sum(mask_BxN), 1.0)
        metrics = dict(truncated_frac=1.0 - jnp.mean(samples.eos.astype(jnp.float32)))
        if plan is not None:
            packed_logprobs = make_packed_logprobs(graphdef, frozen, temperature=temperature,
                                                   micro_batch_size=rl.micro_batch_size)
            rows = PackedBatch(tokens=packing.pack_rows(tokens_BxL, plan.token_src_RxW),
                               segment=plan.segment_RxW, positions=plan.positions_RxW,
                               comp_col=plan.comp_col_RxN, comp_seq=plan.comp_seq_RxN,
                               mask=plan.comp_mask_RxN, adv=None,
                               routing=None if routing is None else packing.pack_rows(routing, plan.token_src_RxW))

            def logprobs(params, tokens_BxL, attn_BxL, routing=None):
                del tokens_BxL, attn_BxL, routing  # packed in `rows`
                return tuple(packing.unpack_completion(x_RxN, plan.unpack_SxN, mask_BxN)
                             for x_RxN in packed_logprobs(params, rows))
        else:
            logprobs = make_logprobs(graphdef, frozen, temperature=temperature,
                                     micro_batch_size=rl.micro_batch_size,
                                     num_new=samples.tokens.shape[1])
        optional = {}
        if replay:
            optional["routing"] = routing
            recompute = make_logprobs(graphdef, frozen, temperature=temperature,
                                      micro_batch_size=rl.micro_batch_size, num_new=samples.tokens.shape[1])
            logp_BxN, _, experts = recompute(params, tokens_BxL, attn_BxL, with_experts=True)
            terms = moe_replay_terms(experts, routing, attn_BxL, logp_BxN, samples.logprobs, mask_BxN)
            routed = jnp.maximum(terms["routed"], 1)
            metrics.update(moe_routing_flip_frac=terms["flip_sum"] / routed,
                           moe_routing_flip_frac_layer=terms["flip_layer_sum"] / routed,
                           moe_sampler_logprob_gap_recompute=terms["gap_recompute_sum"] / num_tokens)
        policy_logp_BxN = None
        if keep_sampler_logp:
            optional["sampler_logp"] = samples.logprobs
        if not on_policy:
            optional["old_logp"], entropy_BxN = logprobs(params, tokens_BxL, attn_BxL, routing)
            policy_logp_BxN = optional["old_logp"]
            terms = rollout_policy_terms(policy_logp_BxN, entropy_BxN, samples.logprobs, mask_BxN)
            metrics.update(entropy=terms["entropy_sum"] / num_tokens,
                           sampler_logprob_gap=terms["sampler_gap_sum"] / num_tokens)
        if rl.beta > 0:
            reference = lora.disabled(params) if adapters else ref_params
            ref_logp_BxN = logprobs(reference, tokens_BxL, attn_BxL, routing)[0]
        if rl.beta > 0 and rl.kl_in_reward:
            # The KL of the policy that sampled (the trainer's logprobs; on policy the update
            # needs none, so this is the one forward it costs) becomes part of the reward.
            if policy_logp_BxN is None:
                policy_logp_BxN = logprobs(params, tokens_BxL, attn_BxL, routing)[0]
            kl_B = losses.sequence_kl(policy_logp_BxN, ref_logp_BxN, mask_BxN, rl.kl_estimator)
            reward_B = reward_B - rl.beta * kl_B
            metrics.update(kl_ref=jnp.sum(kl_B) / num_tokens, kl_penalty=rl.beta * jnp.mean(kl_B))
        elif rl.beta > 0:
            optional["ref_logp"] = ref_logp_BxN
        adv_B = advantages.compute(reward_B, rl.group_size, rl.estimator,
                                   lengths=jnp.sum(mask_BxN, axis=1))
        if rl.overlong_filter:  # DAPO: truncated responses leave the loss, not their groups
            mask_BxN = losses.drop_truncated(mask_BxN, samples.eos)
        return Batch(tokens=tokens_BxL, attn=attn_BxL, mask=mask_BxN, adv=adv_B, **optional), metrics

    return prepare


# ============================================================================ minibatches


def minibatch_order(seed: int, step: int, epoch: int, rows: int) -> np.ndarray:
    """The permutation of the rollout's rows for (seed, step, epoch), int32 [rows] (host)."""
    return np.random.default_rng([seed, step, epoch]).permutation(rows).astype(np.int32)


def make_shuffle(num_minibatches: int):
    """Jittable (batch, order) → `num_minibatches` minibatches: the rows in `order`, split."""

    def shuffle(batch: Batch, order):
        size = order.shape[0] // num_minibatches
        return [jax.tree.map(lambda x: x[order[i * size:(i + 1) * size]], batch)
                for i in range(num_minibatches)]

    return shuffle


# ============================================================================ programs


def make_programs(config, mesh, graphdef, *, pad_id: int, tx, schedule, state_sh, frozen_sh) -> dict:
    """The jitted device programs of a step with their shardings (`state_sh`, `frozen_sh`: those
    of the state and of the frozen model state): split_rng, prepare, shuffle, pack, update and
    update_packed, finish_step. `cfpo_jax.aot` compiles these same programs."""
    rl, sampling_config = config.rl, config.sampling
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PS())
    update_kwargs = dict(temperature=sampling_config.temperature,
                         max_len=sampling_config.max_new_tokens, micro_batch_size=rl.micro_batch_size)
    jit_update = lambda packed: jax.jit(
        make_update(graphdef, tx, schedule, rl, packed=packed, **update_kwargs),
        in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated),
        donate_argnums=0)
    prepare = make_prepare(graphdef, rl, temperature=sampling_config.temperature, pad_id=pad_id,
                           batch_sh=batch_sh, adapters=config.lora.rank > 0,
                           replay=config.model.moe_routing == "replay")
    return dict(
        split_rng=jax.jit(lambda key: tuple(jax.random.split(key)), out_shardings=replicated),
        prepare=jax.jit(prepare, out_shardings=(batch_sh, replicated)),
        shuffle=jax.jit(make_shuffle(rl.num_minibatches), out_shardings=batch_sh),
        pack=jax.jit(packing.pack_minibatch, out_shardings=batch_sh),
        update=jit_update(False),
        update_packed=jit_update(True),
        finish_step=jax.jit(lambda state, rng: dict(state, rng=rng, step=state["step"] + 1),
                            out_shardings=state_sh, donate_argnums=0),
    )


def upload(x, sharding_):
    """Host numpy → a global array with `sharding_` (every host holds the full value): an
    explicit transfer, allowed under the trainer's transfer guard."""
    x = np.asarray(x)
    with jax.transfer_guard_host_to_device("allow"):
        # dtype: a process without devices in `sharding_` calls back nothing to infer it from.
        return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index],
                                            dtype=x.dtype)


class Learner:
    """The learning half of a run: its jitted programs (`make_programs`) and the packing of its
    minibatches (`packing.Packer`, with `rl.pack`)."""

    def __init__(self, config, mesh, graphdef, frozen, *, pad_id: int, tx, schedule, state_sh):
        self.config, self.mesh, self.graphdef, self.frozen = config, mesh, graphdef, frozen
        self.programs = make_programs(config, mesh, graphdef, pad_id=pad_id, tx=tx,
                                      schedule=schedule, state_sh=state_sh,
                                      frozen_sh=jax.tree.map(lambda x: x.sharding, frozen))
        rl = config.rl
        shards = sharding.batch_shards(mesh)
        self.packer = packing.Packer(granule=rl.micro_batch_size or shards) if rl.pack else None
        self._batch_sh = sharding.batch_sharding(mesh)

    def split_rng(self, rng):
        """rng → (next rng, sampler key)."""
        return self.programs["split_rng"](rng)

    def finish_step(self, state, rng):
        """The state of the next step (step + 1, `rng`); state donated."""
        return self.programs["finish_step"](state, rng)

    def _plan(self, lengths_Bx2, rows_S, kind, **widths):
        planned = self.packer.plan(lengths_Bx2, rows_S, kind, **widths)
        return None if planned is None else jax.tree.map(lambda x: upload(x, self._batch_sh), planned)

    def prepare(self, state, samples, reward_B, lengths_Bx2):
        """(rollout `Batch`, device metrics) of scored `samples`: rewards (host [B]) up, then
        the prepare program on device (packed by a plan of all rows with `rl.pack`).
        `lengths_Bx2`: the prompt and completion tokens of each row (host)."""
        rl = self.config.rl
        with jax.transfer_guard("disallow"):
            reward_B = upload(np.asarray(reward_B, np.float32), NamedSharding(self.mesh, PS()))
            plan = None
            if self.packer is not None and prepare_runs_model(rl):
                plan = self._plan(lengths_Bx2, np.arange(len(lengths_Bx2)), "prepare",
                                  prompt_width=data.bucket_width(samples.prompt_tokens.shape[1]),
                                  completion_width=samples.tokens.shape[1])
            return self.programs["prepare"](state["params"], state.get("ref_params"), self.frozen,
                                            samples, reward_B, plan)

    def learn(self, state, batch: Batch, lengths_Bx2, step: int):
        """num_epochs passes over the rollout `batch` of RL step `step`, each in num_minibatches
        updates (a fresh permutation of the rows per epoch; packed per minibatch with `rl.pack`
        where packing saves rows). Returns (state, [metrics of each update], on device)."""
        rl = self.config.rl
        rows = len(lengths_Bx2)
        size = rows // rl.num_minibatches
        widths = dict(prompt_width=batch.tokens.shape[1] - batch.mask.shape[1],
                      completion_width=batch.mask.shape[1])
        update_metrics = []

        def unpacked(order):
            if rl.num_minibatches == 1:
                return [batch]
            return self.programs["shuffle"](batch, upload(order, NamedSharding(self.mesh, PS())))

        def minibatches(order):  # (update program, minibatch)
            if self.packer is None:
                yield from ((self.programs["update"], mb) for mb in unpacked(order))
                return
            padded = None
            for i in range(rl.num_minibatches):
                plan = self._plan(lengths_Bx2, order[i * size:(i + 1) * size], "update", **widths)
                if plan is not None:
                    yield self.programs["update_packed"], self.programs["pack"](batch, plan)
                    continue
                padded = unpacked(order) if padded is None else padded
                yield self.programs["update"], padded[i]

        for epoch in range(rl.num_epochs):
            order = (np.arange(rows, dtype=np.int32) if rl.num_minibatches == 1
                     else minibatch_order(self.config.seed, step, epoch, rows))
            for update, minibatch in minibatches(order):
                state, metrics = update(state, self.frozen, minibatch)
                update_metrics.append(metrics)
        return state, update_metrics

    def packing_metrics(self) -> dict:
        """The packer's counters since the last call ({} without `rl.pack`)."""
        return {} if self.packer is None else self.packer.metrics()
