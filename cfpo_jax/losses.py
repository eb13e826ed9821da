"""Policy objectives, loss aggregation, KL estimators and entropy: pure jnp, no model code.

Conventions (shapes in names: B responses, T completion tokens, V vocabulary):

* `logp_BxT`, `old_logp_BxT`: log-probabilities of the sampled tokens under the current and the
  behaviour policy; `mask_BxT` is 1 on completion tokens (the EOS included) and 0 on padding.
  A row whose mask is all zero is padding and counts nowhere, so batches can be padded freely.
* Objectives are *maximised*; the loss is their negative. Per unit (a token, or a response at
  `level="sequence"`), with ratio r and advantage A:
    - `cfpo`: r·A − |A|/(2ε)·(r − 1)². Its gradient in r, A − (|A|/ε)(r − 1), is zero at
      r* = 1 + ε·sign(A) and restores r toward r* from both sides. With `eps_high` set, ε_high is
      used for A > 0, so r* sits at the same boundary that clip-higher (DAPO) would clip at.
      That asymmetric CFPO is our choice, not the paper's: its reference patches for verl,
      OpenRLHF and TRL each use a single ε for both signs (leave `eps_high` unset to match them).
    - `ppo`: min(r·A, clip(r, 1 − ε, 1 + ε_high)·A), and with `dual_clip` c > 1 the objective of
      A < 0 units is floored at c·A (dual-clip PPO).
  Both have gradient A in r at r = 1, so they give identical on-policy updates.
* `level="sequence"` (GSPO-style): r_i = exp(mean over response i's tokens of the log-ratio); the
  response's objective is assigned to each of its tokens before aggregation, so the aggregations
  below keep their meaning (`token-mean` weights responses by length, `seq-mean-*` does not).
* The log-ratio is clamped to ±20 before `exp` so that a stale token cannot overflow.
* KL to a reference policy is either a loss term (`kl_terms`, aggregated by the same `agg` as the
  policy loss) or, summed per response (`sequence_kl`), a penalty on the reward.
* Packed rows (`cfpo_jax.packing`): the per-token arrays are [R, N] rows of several responses
  each, with `sequence_ids` naming each token's response. Every per-response reduction (token
  counts, per-response sums, the sequence-level ratio) is then a `segment_sums` instead of a
  row sum, so each aggregation computes per response exactly what it does unpacked.
* Entropy control (`entropy_control`, "The Entropy Mechanism of Reinforcement Learning for
  Reasoning Language Models", Cui et al. 2025; as verl's `clip_cov` / `kl_cov` policy losses).
  Per token, the centred product cov_t = (logp_t − mean logp)·(A_t − mean A) (means over the
  tokens of the call, gradient stopped) estimates each token's share of the covariance that
  drives the entropy down. `clip_cov`: among the tokens the clip does not already cut (PPO:
  r beyond its clip boundary on A's side; CFPO: the same would-clip tokens, which its penalty
  pulls back) with lb < cov_t < ub, max(1, ⌊clip_cov_ratio·n⌋) chosen uniformly at random (n =
  the call's tokens; `rng` required) have their objective's gradient stopped — its value stays in
  the loss, so the loss reads the same with or without it (verl multiplies the token's loss by 0;
  the gradients agree). `kl_cov`: the max(1, ⌊kl_cov_ratio·n⌋) tokens of largest cov_t get
  −kl_cov_coef·|logp − old_logp| added to their objective. Both compose with either objective as
  written: the selection and the detach or penalty act on the per-token objective `objective`
  gives, the clip or CFPO's quadratic penalty included. So CFPO + KL-Cov pulls the selected tokens
  toward r = 1 twice — its own penalty restores r toward r* = 1 + ε·sign(A), the |log r| term
  toward 1 — and CFPO + Clip-Cov freezes a few in-band tokens while every other token keeps its
  smooth restoring gradient. (The paper and verl's `kl_cov` drop the clip and use −A·r; with
  `objective="ppo"` here the clip stays; set eps/eps_high large to reproduce theirs.) On policy
  (r = 1) both objectives have the same gradient and nothing is would-clip, so with the same `rng`
  Clip-Cov and KL-Cov give CFPO and PPO the same update. The means, counts and random draw are
  those of one call — per micro-batch under gradient accumulation, as verl's per micro-batch
  loss — so unlike everything else here they are not exactly additive across micro-batches.
  Token level only.
* Off-policy corrections (issue 32). `behaviour_logp` are the sampler's logprobs of the sampled
  tokens. `ratio_reference="recomputed"` (default): r = π/π_old with `old_logp` the learner's
  recomputed logprobs at the start of the step (AReaL's "proximal" policy);
  `"behaviour"`: r = π/π_sampler, `old_logp` unused. `rollout_correction` (with "recomputed"):
  w_t = π_old/π_sampler per token (log-ratio clamped like r's, no gradient); `"tis"` multiplies
  each token's objective by min(w_t, C) (truncated importance sampling), `"mask"` by 1 where
  1/C ≤ w_t ≤ C and 0 elsewhere, C = `rollout_correction_cap`. The weight multiplies the whole
  per-token objective (entropy-control terms included). Masked tokens stay in the aggregation's
  denominator (they contribute 0, as OpenRLHF's icepop), so the KL term's shared denominator
  and exact accumulation hold. Metrics over the tokens: `rollout_is_weight_mean`, `_max` (of the
  untruncated w) and `rollout_corrected_frac` (truncated, w > C, or masked). Token level only.
* Aggregations return a (sum, denominator) pair. Adding pairs over micro-batches or data shards and
  dividing once gives exactly the full-batch value (the denominators do not depend on parameters):
    - `token-mean`: Σ_it l / Σ_it m.
    - `seq-mean-token-mean`: Σ_i (Σ_t l / n_i) / #responses (original GRPO).
    - `seq-mean-token-sum`: Σ_it l / #responses.
    - `seq-mean-token-sum-norm`: Σ_it l / max_len / #responses (Dr.GRPO; `max_len` defaults to T,
      set it to the generation budget so the scale does not depend on padding).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LOG_RATIO_CLAMP = 20.0
# Same bound as verl's low-variance KL: one token whose reference probability collapsed must not
# dominate the batch.
KL_VALUE_CLAMP = 10.0


# ----------------------------------------------------------------------------- objectives


def cfpo_objective(ratio, adv, eps_low, eps_high, dual_clip):
    eps = jnp.where(adv > 0, eps_high, eps_low)
    return ratio * adv - jnp.abs(adv) / (2.0 * eps) * jnp.square(ratio - 1.0)


def ppo_objective(ratio, adv, eps_low, eps_high, dual_clip):
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    objective = jnp.minimum(ratio * adv, clipped * adv)
    if dual_clip is not None:
        objective = jnp.where(adv < 0, jnp.maximum(objective, dual_clip * adv), objective)
    return objective


# ----------------------------------------------------------------------------- per-response sums


def row_sums(x_BxT):
    """Per-response sums of unpacked [B, T] arrays (one response a row): [B]."""
    return jnp.sum(x_BxT, axis=-1)


def segment_sums(sequence_ids, num_sequences: int):
    """Per-response sums of packed arrays: x [...] with `sequence_ids` [...] of the same shape
    (ints in [0, num_sequences)) → [num_sequences]."""
    ids = jnp.asarray(sequence_ids).reshape(-1)
    return lambda x: jax.ops.segment_sum(x.reshape(-1), ids, num_segments=num_sequences)


# ----------------------------------------------------------------------------- aggregations
# (values, mask, max_len, sequence_sums) → (sum, denominator); `sequence_sums` reduces a
# per-token array to per-response sums (`row_sums` unpacked, `segment_sums` packed).


def _token_mean(values_BxT, mask_BxT, max_len, sequence_sums=row_sums):
    del max_len, sequence_sums
    return jnp.sum(values_BxT * mask_BxT), jnp.sum(mask_BxT)


def _seq_mean_token_mean(values_BxT, mask_BxT, max_len, sequence_sums=row_sums):
    del max_len
    count_B = sequence_sums(mask_BxT)
    seq_B = sequence_sums(values_BxT * mask_BxT) / jnp.maximum(count_B, 1.0)
    return jnp.sum(seq_B), jnp.sum(count_B > 0).astype(values_BxT.dtype)


def _seq_mean_token_sum(values_BxT, mask_BxT, max_len, sequence_sums=row_sums):
    del max_len
    count_B = sequence_sums(mask_BxT)
    return jnp.sum(values_BxT * mask_BxT), jnp.sum(count_B > 0).astype(values_BxT.dtype)


def _seq_mean_token_sum_norm(values_BxT, mask_BxT, max_len, sequence_sums=row_sums):
    total, num_seqs = _seq_mean_token_sum(values_BxT, mask_BxT, None, sequence_sums)
    return total / max_len, num_seqs


# ----------------------------------------------------------------------------- KL estimators


def _k1(log_ratio):  # log_ratio = log(ref / pi); unbiased for KL(pi||ref) but zero expected gradient
    return -log_ratio


def _k2(log_ratio):  # its gradient is the unbiased gradient of KL(pi||ref)
    return 0.5 * jnp.square(log_ratio)


def _k3(log_ratio):  # unbiased, non-negative, low variance (Schulman's "k3")
    # expm1 keeps precision near ρ = 1, where exp(x) − 1 − x cancels in float32.
    return jnp.minimum(jnp.expm1(log_ratio) - log_ratio, KL_VALUE_CLAMP)


# ----------------------------------------------------------------------------- registry

REGISTRY: dict[str, dict[str, Callable]] = {
    "objective": {"cfpo": cfpo_objective, "ppo": ppo_objective},
    "agg": {
        "token-mean": _token_mean,
        "seq-mean-token-mean": _seq_mean_token_mean,
        "seq-mean-token-sum": _seq_mean_token_sum,
        "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
    },
    "kl": {"k1": _k1, "k2": _k2, "k3": _k3},
    "level": {"token": None, "sequence": None},
    "entropy_control": {"none": None, "clip_cov": None, "kl_cov": None},
    "ratio_reference": {"recomputed": None, "behaviour": None},
    "rollout_correction": {"none": None, "tis": None, "mask": None},
}


def lookup(kind: str, name: str) -> Callable:
    """Returns the registered `kind` (a key of REGISTRY: 'objective', 'agg', 'kl', 'level', ...)
    called `name` (None for the kinds that only name a choice)."""
    table = REGISTRY[kind]
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {sorted(table)}")
    return table[name]


# ----------------------------------------------------------------------------- entropy control


def token_covariance(logp_BxT, adv_BxT, mask_BxT):
    """cov_t = (logp_t − mean logp)·(A_t − mean A), means over the masked tokens; no gradient.
    0 off the mask."""
    logp_BxT, adv_BxT = jax.lax.stop_gradient(logp_BxT), jax.lax.stop_gradient(adv_BxT)
    count = jnp.maximum(jnp.sum(mask_BxT), 1.0)
    mean_logp = jnp.sum(logp_BxT * mask_BxT) / count
    mean_adv = jnp.sum(adv_BxT * mask_BxT) / count
    return (logp_BxT - mean_logp) * (adv_BxT - mean_adv) * mask_BxT


def _first_k(score_BxT, eligible_BxT, k):
    """Bool [B, T]: the `k` (traced) eligible tokens of largest score (ties: the first in
    row-major order)."""
    flat = jnp.where(eligible_BxT, score_BxT, -jnp.inf).reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return (rank.reshape(score_BxT.shape) < k) & eligible_BxT


def _selection_size(fraction, mask_BxT):
    return jnp.maximum(jnp.floor(fraction * jnp.sum(mask_BxT)), 1.0)


def clip_cov_selection(cov_BxT, mask_BxT, clipped_BxT, *, ratio, lb, ub, rng):
    """Clip-Cov's tokens: max(1, ⌊ratio·n⌋) drawn uniformly (by `rng`) among the masked tokens
    not `clipped_BxT` with lb < cov < ub (all of them when fewer). Bool [B, T]."""
    eligible = (mask_BxT > 0) & ~clipped_BxT & (cov_BxT > lb) & (cov_BxT < ub)
    draw_BxT = jax.random.uniform(rng, cov_BxT.shape)
    return _first_k(draw_BxT, eligible, _selection_size(ratio, mask_BxT))


def kl_cov_selection(cov_BxT, mask_BxT, *, ratio):
    """KL-Cov's tokens: the max(1, ⌊ratio·n⌋) masked tokens of largest covariance. Bool [B, T]."""
    return _first_k(cov_BxT, mask_BxT > 0, _selection_size(ratio, mask_BxT))


# ----------------------------------------------------------------------------- overlong filter


def drop_truncated(mask_BxT, eos_B):
    """DAPO's overlong filter: the loss mask with the rows that hit the budget without an EOS
    (`eos_B` False) zeroed, so truncated responses leave the loss (their rewards still count in
    their group's advantages). float32 [B, T]."""
    return jnp.asarray(mask_BxT, jnp.float32) * jnp.asarray(eos_B, jnp.float32)[:, None]


# ----------------------------------------------------------------------------- rollout correction


def rollout_weights(old_logp_BxT, behaviour_logp_BxT, mask_BxT, *, correction: str, cap: float):
    """(w [B, T], the factor on each token's objective [B, T], corrected bool [B, T]) with
    w = π_old/π_sampler (no gradient): `tis` factor min(w, C), corrected where w > C; `mask`
    factor 1 on 1/C ≤ w ≤ C else 0, corrected outside."""
    log_w = jnp.clip(old_logp_BxT - behaviour_logp_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w_BxT = jax.lax.stop_gradient(jnp.where(mask_BxT > 0, jnp.exp(log_w), 1.0))
    if correction == "tis":
        corrected = w_BxT > cap
        factor = jnp.minimum(w_BxT, cap)
    elif correction == "mask":
        corrected = (w_BxT > cap) | (w_BxT < 1.0 / cap)
        factor = jnp.where(corrected, 0.0, 1.0)
    else:
        raise ValueError(f"rollout correction {correction!r}: weights exist for 'tis' and 'mask'")
    return w_BxT, factor, corrected & (mask_BxT > 0)


# ----------------------------------------------------------------------------- policy loss

# Terms that combine across micro-batches by max / min; every other term is a sum.
_MAX_TERMS = ("ratio_max", "is_weight_max")
_MIN_TERMS = ("ratio_min",)


def _check_shapes(logp, old_logp, advantages, mask, level, num_sequences):
    if logp.ndim != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            "logp, old_logp and mask must share one [B, T] shape; got "
            f"logp {logp.shape}, old_logp {old_logp.shape}, mask {mask.shape}"
        )
    per_response = (num_sequences,) if num_sequences is not None else logp.shape[:1]
    valid = [per_response] + ([logp.shape] if level == "token" else [])
    if advantages.shape not in valid:
        raise ValueError(
            f"advantages has shape {advantages.shape}; at level={level!r} valid shapes are "
            f"{[tuple(v) for v in valid]} for logp of shape {logp.shape}"
        )


def policy_loss_terms(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    objective: str = "cfpo",
    eps: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    level: str = "token",
    agg: str = "token-mean",
    max_len: float | None = None,
    sequence_ids=None,
    num_sequences: int | None = None,
    entropy_control: str = "none",
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-3,
    kl_cov_coef: float = 1.0,
    rng=None,
    behaviour_logp=None,
    ratio_reference: str = "recomputed",
    rollout_correction: str = "none",
    rollout_correction_cap: float = 2.0,
) -> dict[str, jax.Array]:
    """The additive terms of `policy_loss` for one (micro-)batch; see the module docstring.

    Entropy control (`entropy_control` "clip_cov" | "kl_cov", level "token"; `rng` a key for
    clip_cov) adds the term `cov_selected_count`; `behaviour_logp` [B, T] (the sampler's
    logprobs) is needed by `ratio_reference="behaviour"` and by `rollout_correction`
    ("tis" | "mask", cap C > 1), which adds `is_weight_sum`, `is_weight_max`, `corrected_count`.

    Packed rows: `sequence_ids` [R, T] (int, the response of each token) and `num_sequences`;
    per-response advantages are then [num_sequences]. Responses with no token in this batch
    count nowhere, so a micro-batch of packed rows may name all of its minibatch's responses.

    Returns scalars: `loss_sum`, `loss_denom` (loss = loss_sum / loss_denom), and metric terms
    (`clip_count`, `ratio_dev_sum`, `ratio_count`, `ppo_kl_sum`, `token_count`, `ratio_max`,
    `ratio_min`). Combine batches with `combine_terms`, turn into values with `finalize_terms`.
    """
    objective_fn = lookup("objective", objective)
    agg_fn = lookup("agg", agg)
    lookup("level", level)
    if eps <= 0 or (eps_high is not None and eps_high <= 0):
        raise ValueError(f"eps and eps_high must be > 0; got eps={eps}, eps_high={eps_high}")
    if dual_clip is not None and (objective != "ppo" or dual_clip <= 1.0):
        raise ValueError(
            f"dual_clip={dual_clip} needs objective='ppo' and a value > 1 (got {objective!r})"
        )
    lookup("entropy_control", entropy_control)
    lookup("ratio_reference", ratio_reference)
    lookup("rollout_correction", rollout_correction)
    if level != "token" and (entropy_control != "none" or rollout_correction != "none"):
        raise ValueError(
            f"entropy_control={entropy_control!r} and rollout_correction={rollout_correction!r} "
            f"act per token; they need level='token' (got {level!r})"
        )
    if entropy_control == "clip_cov" and rng is None:
        raise ValueError("entropy_control='clip_cov' draws its tokens at random: pass rng")
    if (ratio_reference == "behaviour" or rollout_correction != "none") and behaviour_logp is None:
        raise ValueError(
            f"ratio_reference={ratio_reference!r} / rollout_correction={rollout_correction!r} "
            "need behaviour_logp (the sampler's logprobs)"
        )
    if rollout_correction != "none" and ratio_reference != "recomputed":
        raise ValueError(
            f"rollout_correction={rollout_correction!r} weighs π_old/π_sampler; with "
            "ratio_reference='behaviour' the ratio already is against the sampler (use 'none')"
        )
    if rollout_correction != "none" and rollout_correction_cap <= 1.0:
        raise ValueError(f"rollout_correction_cap must be > 1; got {rollout_correction_cap}")
    if behaviour_logp is not None:
        behaviour_logp = jnp.asarray(behaviour_logp, jnp.float32)
        if ratio_reference == "behaviour":
            old_logp = behaviour_logp
    logp, old_logp, advantages = (jnp.asarray(x, jnp.float32) for x in (logp, old_logp, advantages))
    mask_BxT = jnp.asarray(mask, jnp.float32)
    if (sequence_ids is None) != (num_sequences is None):
        raise ValueError("packed rows need both sequence_ids and num_sequences")
    _check_shapes(logp, old_logp, advantages, mask_BxT, level, num_sequences)
    eps_high = eps if eps_high is None else eps_high
    max_len = logp.shape[1] if max_len is None else max_len
    if sequence_ids is None:
        sequence_sums, to_tokens = row_sums, lambda x_B: x_B[:, None]
    else:
        sequence_sums = segment_sums(sequence_ids, num_sequences)
        to_tokens = lambda x_S: jnp.take(x_S, jnp.asarray(sequence_ids), axis=0)

    log_ratio_BxT = jnp.where(
        mask_BxT > 0, jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), 0.0
    )
    if level == "token":
        adv = advantages if advantages.ndim == 2 else to_tokens(advantages)
        ratio = jnp.exp(log_ratio_BxT)
        adv = jnp.broadcast_to(adv, ratio.shape)
        unit_mask = mask_BxT
        objective_BxT = objective_fn(ratio, adv, eps, eps_high, dual_clip)
    else:
        count_B = sequence_sums(mask_BxT)
        ratio = jnp.exp(sequence_sums(log_ratio_BxT) / jnp.maximum(count_B, 1.0))
        adv = advantages
        unit_mask = (count_B > 0).astype(jnp.float32)
        objective_B = objective_fn(ratio, adv, eps, eps_high, dual_clip)
        objective_BxT = jnp.broadcast_to(to_tokens(objective_B), mask_BxT.shape)

    would_clip = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps))
    extra = {}
    if entropy_control != "none":
        cov_BxT = token_covariance(logp, adv, mask_BxT)
        if entropy_control == "clip_cov":
            selected = clip_cov_selection(cov_BxT, mask_BxT, would_clip, ratio=clip_cov_ratio,
                                          lb=clip_cov_lb, ub=clip_cov_ub, rng=rng)
            objective_BxT = jnp.where(selected, jax.lax.stop_gradient(objective_BxT),
                                      objective_BxT)
        else:
            selected = kl_cov_selection(cov_BxT, mask_BxT, ratio=kl_cov_ratio)
            objective_BxT = objective_BxT - jnp.where(
                selected, kl_cov_coef * jnp.abs(log_ratio_BxT), 0.0)
        extra["cov_selected_count"] = jnp.sum(selected * mask_BxT)
    if rollout_correction != "none":
        w_BxT, factor_BxT, corrected = rollout_weights(
            old_logp, behaviour_logp, mask_BxT, correction=rollout_correction,
            cap=rollout_correction_cap)
        objective_BxT = objective_BxT * factor_BxT
        extra.update(is_weight_sum=jnp.sum(w_BxT * mask_BxT),
                     is_weight_max=jnp.max(jnp.where(mask_BxT > 0, w_BxT, -jnp.inf)),
                     corrected_count=jnp.sum(corrected * mask_BxT))

    loss_sum, loss_denom = agg_fn(-objective_BxT, mask_BxT, max_len, sequence_sums)
    valid = unit_mask > 0
    return extra | {
        "loss_sum": loss_sum,
        "loss_denom": loss_denom,
        "clip_count": jnp.sum(would_clip * unit_mask),
        "ratio_dev_sum": jnp.sum(jnp.abs(ratio - 1.0) * unit_mask),
        "ratio_count": jnp.sum(unit_mask),
        "ppo_kl_sum": jnp.sum(-log_ratio_BxT * mask_BxT),
        "token_count": jnp.sum(mask_BxT),
        "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
    }


def combine_terms(a: dict, b: dict) -> dict:
    """Combines the terms of two disjoint (micro-)batches into the terms of their union."""
    out = {}
    for key in a:
        if key in _MAX_TERMS:
            out[key] = jnp.maximum(a[key], b[key])
        elif key in _MIN_TERMS:
            out[key] = jnp.minimum(a[key], b[key])
        else:
            out[key] = a[key] + b[key]
    return out


def _safe_div(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def finalize_terms(terms: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) from summed terms. With no valid unit the ratio extremes read 1."""
    has_units = terms["ratio_count"] > 0
    metrics = {
        "clip_frac": _safe_div(terms["clip_count"], terms["ratio_count"]),
        "ratio_dev": _safe_div(terms["ratio_dev_sum"], terms["ratio_count"]),
        "ppo_kl": _safe_div(terms["ppo_kl_sum"], terms["token_count"]),
        "ratio_max": jnp.where(has_units, terms["ratio_max"], 1.0),
        "ratio_min": jnp.where(has_units, terms["ratio_min"], 1.0),
    }
    if "cov_selected_count" in terms:
        metrics["entropy_control_frac"] = _safe_div(terms["cov_selected_count"],
                                                    terms["token_count"])
    if "is_weight_sum" in terms:
        metrics.update(
            rollout_is_weight_mean=_safe_div(terms["is_weight_sum"], terms["token_count"]),
            rollout_is_weight_max=jnp.where(terms["token_count"] > 0, terms["is_weight_max"], 1.0),
            rollout_corrected_frac=_safe_div(terms["corrected_count"], terms["token_count"]),
        )
    return _safe_div(terms["loss_sum"], terms["loss_denom"]), metrics


def policy_loss(logp, old_logp, advantages, mask, **kwargs) -> tuple[jax.Array, dict]:
    """Scalar loss to minimise and its metrics; keyword arguments as `policy_loss_terms`.

    Metrics: `clip_frac` (fraction of units with r > 1+ε_high and A > 0 or r < 1−ε and A < 0 —
    for CFPO the units PPO *would* clip), `ratio_dev` (mean |r − 1|), `ppo_kl` (token mean of
    old_logp − logp), `ratio_max`, `ratio_min`; with entropy control `entropy_control_frac`
    (selected tokens over tokens), with a rollout correction `rollout_is_weight_mean`,
    `rollout_is_weight_max`, `rollout_corrected_frac`.
    """
    return finalize_terms(policy_loss_terms(logp, old_logp, advantages, mask, **kwargs))


# ----------------------------------------------------------------------------- KL, entropy


def kl(logp, ref_logp, estimator: str = "k3"):
    """Per-token estimate of KL(π || π_ref) from sampled-token logprobs, same shape as `logp`.

    `k1` = log π − log π_ref, `k2` = ½(log π − log π_ref)², `k3` = ρ − log ρ − 1 with
    ρ = π_ref/π (clamped at 10). The log-ratio is clamped to ±20. As a loss term, k1 has zero
    expected gradient; use k2 or k3.
    """
    fn = lookup("kl", estimator)
    log_ratio = jnp.clip(
        jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32),
        -LOG_RATIO_CLAMP,
        LOG_RATIO_CLAMP,
    )
    return fn(log_ratio)


def kl_terms(logp, ref_logp, mask, *, estimator: str = "k3", agg: str = "token-mean",
             max_len: float | None = None, sequence_sums=row_sums) -> dict[str, jax.Array]:
    """The KL-to-reference loss term of one (micro-)batch, aggregated like the policy loss.

    Returns scalars `kl_loss_sum` — the per-token estimate aggregated by `agg` (the numerator of
    the pair `agg` returns; its denominator is the policy loss's, as both use the same masks), so
    the loss with a KL term is (loss_sum + β·kl_loss_sum) / loss_denom — and `kl_sum`, the plain
    token sum (divided by `token_count` it is the `kl_ref` metric). Both add over micro-batches.
    Packed rows pass `sequence_sums=segment_sums(sequence_ids, num_sequences)`.
    """
    mask_BxT = jnp.asarray(mask, jnp.float32)
    max_len = mask_BxT.shape[1] if max_len is None else max_len
    kl_BxT = kl(logp, ref_logp, estimator) * mask_BxT
    kl_loss_sum, _ = lookup("agg", agg)(kl_BxT, mask_BxT, max_len, sequence_sums)
    return {"kl_loss_sum": kl_loss_sum, "kl_sum": jnp.sum(kl_BxT)}


def sequence_kl(logp, ref_logp, mask, estimator: str = "k3"):
    """Σ_t KL_t of each response, float32 [B]: with `rl.kl_in_reward`, β times this is subtracted
    from the response's reward before advantages (as RLOO in OpenRLHF and verl do)."""
    return jnp.sum(kl(logp, ref_logp, estimator) * jnp.asarray(mask, jnp.float32), axis=-1)


def token_logprobs_and_entropy(logits_xV, target_logit_x, temperature: float = 1.0):
    """(log softmax(logits / temperature) at the target, entropy (nats) of that softmax), float32
    [...], given the target's own logit `target_logit_x` (= logits_xV at the target index).

    The target logit comes in apart, computed from the target's embedding row alone
    (`Transformer.target_logits`): picking it out of [..., V] would make autodiff scatter its
    cotangent into a [..., V] zero tensor. Here the gradient reaching the logits is the softmax
    term only, which fuses into the unembedding's backward matmuls. Entropy = logsumexp − Σ p·z.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for logprobs; got {temperature}")
    scaled_xV = jnp.asarray(logits_xV, jnp.float32) / temperature
    logsumexp_x = jax.nn.logsumexp(scaled_xV, axis=-1)
    probs_xV = jnp.exp(scaled_xV - logsumexp_x[..., None])
    entropy_x = logsumexp_x - jnp.sum(probs_xV * scaled_xV, axis=-1)
    return jnp.asarray(target_logit_x, jnp.float32) / temperature - logsumexp_x, entropy_x
