"""Advantage estimators for group-sampled responses: pure jnp, registry by name.

`rewards` is a float vector [B] laid out group by group: B = num_prompts × group_size, and the
responses to one prompt are contiguous. Every estimator returns one advantage per response [B]
(float32), never NaN. A group whose rewards are all equal gets zero advantage, except under
`reinforce_pp` with ragged lengths (see there).

* `grpo`: (r − mean_g) / (std_g + 1e-6), std unbiased (Shao et al. 2024, as in TRL/verl).
* `drgrpo`: r − mean_g; no std normalisation (Liu et al. 2025, "Dr. GRPO").
* `rloo`: r − mean of the other G − 1 rewards of the group (Ahmadian et al. 2024).
* `reinforce_pp`: verl's REINFORCE++ with baseline (`compute_reinforce_plus_plus_baseline_outcome_
  advantage`): c = r − mean_g (c = r for groups of one), broadcast to every completion token, then
  whitened over all tokens of the batch (verl's `masked_whiten`): (c − μ) / sqrt(σ² + 1e-8) with
  μ and σ² (unbiased, over the token count) weighted by each response's token count `lengths`.
  So long responses weigh more, and on ragged batches μ ≠ 0: a flat group gets −μ/σ, as in verl.
  Without `lengths` every response counts once (then μ = 0 exactly and flat groups stay 0).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

GRPO_STD_EPS = 1e-6
WHITEN_VAR_EPS = 1e-8


def _centred(rewards_NxG):
    """r − group mean, exactly zero for a flat group (a float mean of equal values can be off)."""
    flat_Nx1 = jnp.ptp(rewards_NxG, axis=1, keepdims=True) == 0
    return jnp.where(flat_Nx1, 0.0, rewards_NxG - jnp.mean(rewards_NxG, axis=1, keepdims=True))


def _grpo(rewards_NxG):
    std_Nx1 = jnp.std(rewards_NxG, axis=1, ddof=1, keepdims=True)
    return _centred(rewards_NxG) / (std_Nx1 + GRPO_STD_EPS)


def _drgrpo(rewards_NxG):
    return _centred(rewards_NxG)


def _rloo(rewards_NxG):
    # r − (Σ_g r − r)/(G − 1) = G/(G − 1) · (r − mean_g)
    g = rewards_NxG.shape[1]
    return _centred(rewards_NxG) * (g / (g - 1))


def _reinforce_pp(rewards_NxG, lengths_NxG=None):
    centred = rewards_NxG if rewards_NxG.shape[1] == 1 else _centred(rewards_NxG)
    if lengths_NxG is None:
        # Equal weights: group-centred values have batch mean zero, so whitening only rescales;
        # skipping the (rounding-only) shift keeps flat groups at exactly zero.
        var = jnp.sum(jnp.square(centred)) / max(centred.size - 1, 1)
        return centred * jax.lax.rsqrt(var + WHITEN_VAR_EPS)
    tokens = jnp.sum(lengths_NxG)
    mean = jnp.sum(lengths_NxG * centred) / tokens
    var = jnp.sum(lengths_NxG * jnp.square(centred - mean)) / jnp.maximum(tokens - 1, 1)
    return (centred - mean) * jax.lax.rsqrt(var + WHITEN_VAR_EPS)


ESTIMATORS: dict[str, Callable] = {
    "grpo": _grpo,
    "drgrpo": _drgrpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
}
# A leave-one-out mean or an unbiased std needs at least two responses per group.
_MIN_GROUP_SIZE = {"grpo": 2, "rloo": 2}


def compute(rewards, group_size: int, estimator: str = "grpo", lengths=None) -> jax.Array:
    """Advantages [B] for `rewards` [B] in groups of `group_size` (static) by `estimator`.

    lengths: [B] completion token counts (the loss mask's row sums); `reinforce_pp` weighs each
    response by them, as verl does; the other estimators ignore them.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {sorted(ESTIMATORS)}")
    rewards_B = jnp.asarray(rewards, jnp.float32)
    if rewards_B.ndim != 1:
        raise ValueError(f"rewards must be a vector [B]; got shape {rewards_B.shape}")
    if group_size < _MIN_GROUP_SIZE.get(estimator, 1):
        raise ValueError(
            f"estimator {estimator!r} needs group_size >= {_MIN_GROUP_SIZE[estimator]}; "
            f"got {group_size}"
        )
    if rewards_B.shape[0] % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the batch of {rewards_B.shape[0]} rewards"
        )
    rewards_NxG = rewards_B.reshape(-1, group_size)
    if estimator == "reinforce_pp" and lengths is not None:
        lengths_B = jnp.asarray(lengths, jnp.float32)
        if lengths_B.shape != rewards_B.shape:
            raise ValueError(f"lengths must be [B] = {rewards_B.shape}; got {lengths_B.shape}")
        return _reinforce_pp(rewards_NxG, lengths_B.reshape(-1, group_size)).reshape(-1)
    return ESTIMATORS[estimator](rewards_NxG).reshape(-1)
