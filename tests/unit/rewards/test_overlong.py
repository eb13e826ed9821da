"""DAPO's soft overlong punishment against its equation written here; the overlong filter."""

import numpy as np
import pytest

from cfpo_jax import losses
from cfpo_jax.rewards import overlong


def dapo_r_len(length, l_max, l_cache, p):  # DAPO eq. 13, scaled by the penalty factor
    if length <= l_max - l_cache:
        return 0.0
    return p * ((l_max - l_cache) - length) / l_cache


def test_penalty_is_linear_over_the_last_buffer_tokens():
    lengths = np.array([0, 10, 96, 97, 100, 112, 127, 128])
    got = overlong.overlong_penalty(lengths, max_len=128, buffer=32, penalty=0.5)
    want = [dapo_r_len(n, 128, 32, 0.5) for n in lengths]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[-1] == pytest.approx(-0.5) and got.dtype == np.float32


def test_shape_rewards_adds_the_penalty_and_logs_it():
    reward = np.array([1.0, 0.0, 1.0, 1.0])
    shaped, metrics = overlong.shape_rewards(reward, [4, 8, 7, 2], max_len=8, buffer=2, penalty=1.0)
    np.testing.assert_allclose(shaped, [1.0, -1.0, 0.5, 1.0])
    assert metrics == dict(overlong_penalty_mean=pytest.approx(-1.5 / 4),
                           overlong_penalised_frac=0.5)


def test_zero_buffer_is_off_and_bad_values_are_named():
    np.testing.assert_array_equal(overlong.overlong_penalty([8, 3], 8, 0, 1.0), [0.0, 0.0])
    with pytest.raises(ValueError, match="buffer must be in \\[0, 8\\].*got 9"):
        overlong.overlong_penalty([8], 8, 9, 1.0)
    with pytest.raises(ValueError, match="penalty must be >= 0; got -1"):
        overlong.overlong_penalty([8], 8, 2, -1.0)


def test_overlong_filter_takes_truncated_responses_out_of_the_loss():
    rng = np.random.default_rng(0)
    logp, old_logp = rng.normal(-1, 0.3, (2, 4, 5))
    adv = np.array([1.0, -0.5, 0.7, 2.0])
    mask = np.ones((4, 5))
    mask[1, 3:] = 0
    eos = np.array([True, True, False, False])
    filtered = losses.drop_truncated(mask, eos)
    np.testing.assert_array_equal(filtered, mask * eos[:, None])
    # the loss of the filtered batch is the loss of the untruncated rows alone
    kept, _ = losses.policy_loss(logp, old_logp, adv, filtered, agg="seq-mean-token-mean")
    alone, _ = losses.policy_loss(logp[:2], old_logp[:2], adv[:2], mask[:2],
                                  agg="seq-mean-token-mean")
    np.testing.assert_allclose(float(kept), float(alone), rtol=1e-6)
