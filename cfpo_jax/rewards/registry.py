"""Reward functions by name: the built-ins, or a user function named "package.module:function".

"rm:<path or hub id>" names a learned reward model instead; it is not a host function and only
`Scorer` runs it (on device, see `cfpo_jax.rewards.reward_model`)."""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

from cfpo_jax.rewards import functions

RewardFn = Callable[..., np.ndarray]
REWARD_MODEL_PREFIX = "rm:"

REGISTRY: dict[str, RewardFn] = {
    "math": functions.math_reward,
    "gsm8k": functions.gsm8k_reward,
    "gsm8k_strict": functions.gsm8k_strict_reward,
    "format": functions.format_reward,
}

# The answer each built-in compares, for majority voting (evaluate's maj@N); two completions
# with the same key get the same score from that function.
VOTE_KEYS: dict[str, Callable[[str], str | None]] = {
    "math": functions.math_vote_key,
    "gsm8k": functions.gsm8k_vote_key,
    "gsm8k_strict": lambda completion: functions.gsm8k_vote_key(completion, flexible=False),
}


def get(name: str) -> RewardFn:
    """The reward function registered as `name`, or the user function "package.module:function"."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(REWARD_MODEL_PREFIX):
        raise ValueError(f"{name!r} is a reward model, scored on device by rewards.Scorer; it has "
                         "no host function")
    if ":" not in name:
        raise ValueError(
            f"unknown reward function {name!r}; valid: {sorted(REGISTRY)} or 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {name!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {name!r}: module {module_name!r} has no function {attr!r}")
    return fn
