"""Advantage estimators for group-sampled responses: pure jnp, registry by name.

`rewards` is a float vector [B] laid out group by group: B = num_prompts × group_size, and the
responses to one prompt are contiguous. Every estimator returns one advantage per response [B]
(float32). A group whose rewards are all equal gets zero advantage, never NaN.

* `grpo`: (r − mean_g) / (std_g + 1e-6), std unbiased (Shao et al. 2024, as in TRL/verl).
* `drgrpo`: r − mean_g; no std normalisation (Liu et al. 2025, "Dr. GRPO").
* `rloo`: r − mean of the other G − 1 rewards of the group (Ahmadian et al. 2024).
* `reinforce_pp`: r − mean_g, then whitened over the whole batch with the unbiased variance
  ((x − mean) / sqrt(var + 1e-8)), as verl's REINFORCE++ with baseline.
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


def _reinforce_pp(rewards_NxG):
    # Group-centred values already have batch mean zero, so whitening only rescales; skipping the
    # (rounding-only) shift keeps flat groups at exactly zero.
    centred = _centred(rewards_NxG)
    var = jnp.sum(jnp.square(centred)) / max(centred.size - 1, 1)
    return centred * jax.lax.rsqrt(var + WHITEN_VAR_EPS)


ESTIMATORS: dict[str, Callable] = {
    "grpo": _grpo,
    "drgrpo": _drgrpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
}
# A leave-one-out mean or an unbiased std needs at least two responses per group.
_MIN_GROUP_SIZE = {"grpo": 2, "rloo": 2}


def compute(rewards, group_size: int, estimator: str = "grpo") -> jax.Array:
    """Advantages [B] for `rewards` [B] in groups of `group_size` (static) by `estimator`."""
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
    return ESTIMATORS[estimator](rewards_NxG).reshape(-1)
