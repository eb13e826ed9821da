"""Reward functions: a registry by name, user functions by "package.module:function", a scorer.

Every reward function has one batch signature,

    fn(completions: list[str], answers: list[str], **example_fields) -> np.ndarray [B] float32,

where `example_fields` are the dataset's other columns (lists of length B). Built in:

* `math`: last `\\boxed{}` (math-verify's extraction as fallback) checked by math-verify, gold
  first; 1.0 / 0.0.
* `gsm8k`: number after `####`, else in the last `\\boxed{}`, else the last number; exact
  numeric comparison (commas removed). `gsm8k_strict`: without the last-number fallback.
* `code`: 1.0 when the completion's Python passes the row's unit tests (HumanEval's `test` +
  `entry_point`, or MBPP-style `tests`), run in `cfpo_jax.sandbox`; see `rewards.code`.
* `format`: 1.0 for a well-formed final answer (closed non-empty `\\boxed{}` or `#### n`); give it
  a small weight in `config.rewards.weights`.

Score through `Scorer` (weighted sum, per-function values, failure counts). Every function runs
in worker processes under a deadline and an address-space limit (`workers`), the built-ins also
when called directly, except `code`, whose every item runs in its own sandboxed process
(`registry.SANDBOXED`); `guards` rejects the known blow-ups of symbolic maths before any parsing.
"""

from __future__ import annotations

from cfpo_jax.rewards import registry, workers
from cfpo_jax.rewards.registry import NAMES, SANDBOXED, VOTE_KEYS
from cfpo_jax.rewards.scorer import Scorer, Scores
from cfpo_jax.rewards.workers import get

__all__ = ["NAMES", "SANDBOXED", "Scorer", "Scores", "VOTE_KEYS", "get", "registry", "workers"]
