"""Reward functions by name: a table, and nothing that runs them.

`IMPLEMENTATIONS` are the built-ins' in-process functions. Called through `rewards.get` (outside
a reward worker) they are bounded: each item is scored in the process-wide worker pool
(`workers.bounded`: default deadline, address-space limit), so a hostile completion costs at most
the deadline and scores 0; a gold answer the function cannot read still raises ValueError.
Inside a worker they run in-process (`implementation`). This module imports no worker code: the
workers import it.

`code` (`cfpo_jax.rewards.code`) is different: each item already runs in its own sandboxed
process with a wall-clock limit, so it runs in the caller's process, every row of a batch in
parallel (`SANDBOXED`); the scorer calls it directly instead of in a worker.

"rm:<path or hub id>" names a learned reward model instead; it is not a host function and only
`Scorer` runs it (on device, see `cfpo_jax.rewards.reward_model`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cfpo_jax import user_functions
from cfpo_jax.rewards import code, functions

RewardFn = Callable[..., np.ndarray]
REWARD_MODEL_PREFIX = "rm:"

IMPLEMENTATIONS: dict[str, RewardFn] = {
    "math": functions.math_reward,
    "gsm8k": functions.gsm8k_reward,
    "gsm8k_strict": functions.gsm8k_strict_reward,
    "format": functions.format_reward,
}


# Bounded by the sandbox per item: called in the caller's process, not in a reward worker.
SANDBOXED: dict[str, RewardFn] = {"code": code.code_reward}

# Every built-in name (what configs and errors list).
NAMES: tuple[str, ...] = (*IMPLEMENTATIONS, *SANDBOXED)

# The answer each built-in compares, for majority voting (evaluate's maj@N); two completions
# with the same key get the same score from that function. Linear scans: safe in-process.
VOTE_KEYS: dict[str, Callable[[str], str | None]] = {
    "math": functions.math_vote_key,
    "gsm8k": functions.gsm8k_vote_key,
    "gsm8k_strict": lambda completion: functions.gsm8k_vote_key(completion, flexible=False),
    "code": code.code_vote_key,
}


def implementation(name: str) -> RewardFn:
    """The in-process function of `name`: a built-in's own (SANDBOXED ones bound themselves), or
    the user function "package.module:function". Reward models have none."""
    if name.startswith(REWARD_MODEL_PREFIX):
        raise ValueError(f"{name!r} is a reward model, scored on device by rewards.Scorer; it has "
                         "no host function")
    return user_functions.resolve(name, {**IMPLEMENTATIONS, **SANDBOXED}, "reward function")
