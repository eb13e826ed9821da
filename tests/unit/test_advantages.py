"""Advantage estimators on hand-worked examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfpo_jax import advantages

# Two groups of four: one mixed (1, 0, 0, 1), one flat (0.1 × 4, whose float mean is inexact).
REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1])
SQRT3_2 = np.sqrt(3.0) / 2.0  # 0.5 / unbiased std of (1, 0, 0, 1) = 0.5 / sqrt(1/3)


@pytest.mark.parametrize(
    "estimator,expected",
    [
        # (r − 0.5) / (sqrt(1/3) + 1e-6)
        ("grpo", [SQRT3_2, -SQRT3_2, -SQRT3_2, SQRT3_2, 0, 0, 0, 0]),
        ("drgrpo", [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]),
        # 1 − (0 + 0 + 1)/3 = 2/3 ; 0 − (1 + 0 + 1)/3 = −2/3
        ("rloo", [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]),
        # centred (±0.5 × 4, 0 × 4): unbiased batch variance 1/7 → ±0.5·sqrt(7)
        ("reinforce_pp", [0.5 * np.sqrt(7)] * 1 + [-0.5 * np.sqrt(7)] * 2 + [0.5 * np.sqrt(7)]
         + [0, 0, 0, 0]),
    ],
)
def test_hand_worked(estimator, expected):
    fn = jax.jit(advantages.compute, static_argnums=(1, 2))
    out = np.asarray(fn(REWARDS, 4, estimator))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=0)
    assert (out[4:] == 0).all()  # a flat group is exactly zero


@pytest.mark.parametrize("estimator", sorted(advantages.ESTIMATORS))
def test_all_flat_batch_gives_zeros_not_nan(estimator):
    out = advantages.compute(jnp.full(6, 0.3), 3, estimator)
    assert np.all(np.asarray(out) == 0.0)


def _verl_reinforce_pp(rewards, group_size, lengths):
    """verl's REINFORCE++-baseline written out in numpy over a token mask: group mean removed
    (a group of one keeps its score), tiled over each response's tokens, masked_whiten with the
    unbiased masked variance and the mean shifted."""
    rewards = np.asarray(rewards, np.float64)
    scores = rewards.copy()
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        scores[start:start + group_size] = group - (group.mean() if group_size > 1 else 0.0)
    mask = np.arange(max(lengths))[None, :] < np.asarray(lengths)[:, None]
    values = scores[:, None] * mask
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) / np.sqrt(var + 1e-8) * mask
    return np.asarray([row[0] for row in whitened])  # constant over each response's tokens


@pytest.mark.parametrize("group_size", [1, 4])
def test_reinforce_pp_matches_verl_token_weighted_whitening_on_ragged_batches(group_size):
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=16).astype(np.float64)
    rewards[4:8] = 1.0  # a flat group: non-zero advantage under verl's shift on ragged lengths
    lengths = rng.integers(1, 60, size=16)
    out = np.asarray(advantages.compute(rewards, group_size, "reinforce_pp", lengths=lengths))
    expected = _verl_reinforce_pp(rewards, group_size, lengths)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    unweighted = np.asarray(advantages.compute(rewards, group_size, "reinforce_pp"))
    assert np.abs(unweighted - expected).max() > 0.05  # the lengths matter on this batch


def test_rloo_is_leave_one_out_on_random_groups():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=15)
    out = np.asarray(advantages.compute(rewards, 5, "rloo"))
    for i, r in enumerate(rewards):
        group = rewards[(i // 5) * 5:(i // 5 + 1) * 5]
        np.testing.assert_allclose(out[i], r - (group.sum() - r) / 4, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="group_size 3 does not divide the batch of 8"):
        advantages.compute(REWARDS, 3, "grpo")
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*'drgrpo'"):
        advantages.compute(REWARDS, 4, "ppo")
    with pytest.raises(ValueError, match="needs group_size >= 2"):
        advantages.compute(REWARDS, 1, "rloo")
    with pytest.raises(ValueError, match=r"vector \[B\]"):
        advantages.compute(REWARDS.reshape(2, 4), 4, "grpo")
