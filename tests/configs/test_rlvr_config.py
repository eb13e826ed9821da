"""The RLVR recipe fields: defaults keep today's loop, bad values are named with what is valid."""

import pytest

from cfpo_jax import config as config_lib


def _base():
    c = config_lib.base_config()
    c.model.path = "tiny"  # the one field base_config leaves for the user
    return c


def _errors(c) -> str:
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    return str(e.value)


def test_defaults_are_valid_and_off():
    c = _base()
    config_lib.validate(c)  # the new fields are part of the schema
    rl = c.rl
    assert (rl.entropy_control, rl.ratio_reference, rl.rollout_correction) == (
        "none", "recomputed", "none")
    assert not rl.dynamic_sampling and not rl.overlong_filter and c.rewards.overlong_buffer == 0


@pytest.mark.parametrize("field,value,message", [
    ("rl.entropy_control", "clip", "rl.entropy_control='clip'; valid: ['none', 'clip_cov', 'kl_cov']"),
    ("rl.ratio_reference", "sampler", "valid: ['recomputed', 'behaviour']"),
    ("rl.rollout_correction", "icepop", "valid: ['none', 'tis', 'mask']"),
    ("rl.clip_cov_ratio", 0.0, "rl.clip_cov_ratio is a fraction of the tokens, in (0, 1]; got 0.0"),
    ("rl.kl_cov_ratio", 2.0, "rl.kl_cov_ratio is a fraction"),
    ("rl.clip_cov_lb", 6.0, "rl.clip_cov_lb=6.0 must be below rl.clip_cov_ub=5.0"),
    ("rl.kl_cov_coef", -1.0, "rl.kl_cov_coef must be >= 0; got -1.0"),
    ("rl.rollout_correction_cap", 1.0, "rl.rollout_correction_cap must be > 1; got 1.0"),
    ("rl.dynamic_sampling_max_rounds", 0, "rl.dynamic_sampling_max_rounds must be >= 1; got 0"),
    ("rewards.overlong_buffer", 300, "rewards.overlong_buffer must be in [0, sampling.max_new_tokens=256]; got 300"),
    ("rewards.overlong_penalty", -0.5, "rewards.overlong_penalty must be >= 0; got -0.5"),
])
def test_bad_values_are_named(field, value, message):
    c = _base()
    section, key = field.split(".")
    c[section][key] = value
    assert message in _errors(c)


def test_combinations_that_cannot_work_are_named():
    c = _base()
    c.rl.level, c.rl.entropy_control = "sequence", "kl_cov"
    assert ("rl.entropy_control='kl_cov' act per token; they need rl.level='token' "
            "(got 'sequence')") in _errors(c)
    c = _base()
    c.rl.rollout_correction, c.rl.ratio_reference = "tis", "behaviour"
    assert "needs rl.ratio_reference='recomputed'" in _errors(c)
    c = _base()
    c.rl.dynamic_sampling, c.rl.group_size = True, 1
    assert "needs rl.group_size >= 2 (got 1)" in _errors(c)
