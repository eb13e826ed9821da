"""Reward functions by name: the built-ins, or a user function named "package.module:function".

The built-ins in `REGISTRY` are bounded wherever they are called: called directly (outside a
reward worker) they score each item in the process-wide worker pool (`workers.shared_pool`:
default deadline, address-space limit), so a hostile completion costs at most the deadline and
scores 0. A gold answer the function cannot read still raises ValueError. Inside a worker they
run in-process (`implementation`).

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
from cfpo_jax.rewards import code, functions, workers

RewardFn = Callable[..., np.ndarray]
REWARD_MODEL_PREFIX = "rm:"

_IMPLEMENTATIONS: dict[str, RewardFn] = {
    "math": functions.math_reward,
    "gsm8k": functions.gsm8k_reward,
    "gsm8k_strict": functions.gsm8k_strict_reward,
    "format": functions.format_reward,
}


def _bounded(name: str) -> RewardFn:
    implementation = _IMPLEMENTATIONS[name]

    def fn(completions: list[str], answers: list[str], **example_fields) -> np.ndarray:
        if workers.in_worker():
            return implementation(completions, answers, **example_fields)
        for field, values in {"answers": answers, **example_fields}.items():
            if len(values) != len(completions):
                raise ValueError(f"got {len(completions)} completions but {len(values)} "
                                 f"{field}; they pair up")
        results = workers.shared_pool().run(
            [(name, completion, answer, {f: v[i] for f, v in example_fields.items()})
             for i, (completion, answer) in enumerate(zip(completions, answers))])
        raised = [message for _, kind, message in results if kind == "raised"]
        if raised:  # the function's own error (a gold answer it cannot read), not the text's
            raise ValueError(f"reward {name!r}: {raised[0]}")
        return np.asarray([score for score, _, _ in results], np.float32)

    fn.__name__ = name
    fn.__doc__ = implementation.__doc__
    return fn


# Bounded by the sandbox per item: called in the caller's process, not in a reward worker.
SANDBOXED: dict[str, RewardFn] = {"code": code.code_reward}

REGISTRY: dict[str, RewardFn] = {**{name: _bounded(name) for name in _IMPLEMENTATIONS}, **SANDBOXED}

# The answer each built-in compares, for majority voting (evaluate's maj@N); two completions
# with the same key get the same score from that function. Linear scans: safe in-process.
VOTE_KEYS: dict[str, Callable[[str], str | None]] = {
    "math": functions.math_vote_key,
    "gsm8k": functions.gsm8k_vote_key,
    "gsm8k_strict": lambda completion: functions.gsm8k_vote_key(completion, flexible=False),
    "code": code.code_vote_key,
}


def get(name: str) -> RewardFn:
    """The reward function registered as `name`, or the user function "package.module:function"."""
    if name.startswith(REWARD_MODEL_PREFIX) and name not in REGISTRY:
        raise ValueError(f"{name!r} is a reward model, scored on device by rewards.Scorer; it has "
                         "no host function")
    return user_functions.resolve(name, REGISTRY, "reward function")


def implementation(name: str) -> RewardFn:
    """What runs inside a worker: a built-in's in-process implementation, or the user function."""
    return _IMPLEMENTATIONS[name] if name in _IMPLEMENTATIONS else get(name)  # SANDBOXED too
