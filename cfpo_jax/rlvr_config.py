"""Validation of the RLVR recipe fields (issue 34) and off-policy corrections (issue 32, point 3):
`errors(config)` lists what is wrong, for `cfpo_jax.config.validate` to report with the rest.
The fields and their defaults are in `cfpo_jax.config.base_config`."""

from __future__ import annotations

from cfpo_jax import losses

_CHOICES = {
    "entropy_control": tuple(losses.REGISTRY["entropy_control"]),
    "ratio_reference": tuple(losses.REGISTRY["ratio_reference"]),
    "rollout_correction": tuple(losses.REGISTRY["rollout_correction"]),
}


def errors(config) -> list[str]:
    rl, out = config.rl, []
    for key, valid in _CHOICES.items():
        if rl[key] not in valid:
            out.append(f"rl.{key}={rl[key]!r}; valid: {list(valid)}")
    for key in ("clip_cov_ratio", "kl_cov_ratio"):
        if not 0 < rl[key] <= 1:
            out.append(f"rl.{key} is a fraction of the tokens, in (0, 1]; got {rl[key]}")
    if rl.clip_cov_lb >= rl.clip_cov_ub:
        out.append(f"rl.clip_cov_lb={rl.clip_cov_lb} must be below rl.clip_cov_ub="
                   f"{rl.clip_cov_ub}")
    if rl.kl_cov_coef < 0:
        out.append(f"rl.kl_cov_coef must be >= 0; got {rl.kl_cov_coef}")
    per_token = [f"rl.{k}={rl[k]!r}" for k, off in (("entropy_control", "none"),
                                                    ("rollout_correction", "none"))
                 if rl[k] != off]
    if per_token and rl.level != "token":
        out.append(f"{' and '.join(per_token)} act per token; they need rl.level='token' "
                   f"(got {rl.level!r})")
    if rl.rollout_correction != "none" and rl.ratio_reference != "recomputed":
        out.append(f"rl.rollout_correction={rl.rollout_correction!r} weighs π_old/π_sampler; "
                   "it needs rl.ratio_reference='recomputed'")
    if rl.rollout_correction_cap <= 1:
        out.append(f"rl.rollout_correction_cap must be > 1; got {rl.rollout_correction_cap}")
    if rl.dynamic_sampling_max_rounds < 1:
        out.append(f"rl.dynamic_sampling_max_rounds must be >= 1; got "
                   f"{rl.dynamic_sampling_max_rounds}")
    if rl.dynamic_sampling and rl.group_size < 2:
        out.append("rl.dynamic_sampling keeps groups whose rewards differ; it needs "
                   f"rl.group_size >= 2 (got {rl.group_size})")
    budget, rewards = config.sampling.max_new_tokens, config.rewards
    if not 0 <= rewards.overlong_buffer <= budget:
        out.append(f"rewards.overlong_buffer must be in [0, sampling.max_new_tokens={budget}]; "
                   f"got {rewards.overlong_buffer}")
    if rewards.overlong_penalty < 0:
        out.append(f"rewards.overlong_penalty must be >= 0; got {rewards.overlong_penalty}")
    return out
