"""Reward functions: a registry by name, user functions by "package.module:function", a scorer.

Every reward function has one batch signature,

    fn(completions: list[str], answers: list[str], **example_fields) -> np.ndarray [B] float32,

where `example_fields` are the dataset's other columns (lists of length B). Built in:

* `math`: last `\\boxed{}` (math-verify's extraction as fallback) checked by math-verify, gold
  first; 1.0 / 0.0.
* `gsm8k`: number after `####`, else in the last `\\boxed{}`, else the last number; exact
  numeric comparison (commas removed). `gsm8k_strict`: without the last-number fallback.
* `format`: 1.0 for a well-formed final answer (closed non-empty `\\boxed{}` or `#### n`); give it
  a small weight in `config.rewards.weights`.

Score through `Scorer` (weighted sum, per-function values, failure counts). Every function runs
in worker processes under a deadline and an address-space limit (`workers`), the built-ins also
when called directly; `guards` rejects the known blow-ups of symbolic maths before any parsing.
"""

from __future__ import annotations

from cfpo_jax.rewards import workers
from cfpo_jax.rewards.registry import REGISTRY, VOTE_KEYS, get
from cfpo_jax.rewards.scorer import Scorer, Scores

__all__ = ["REGISTRY", "Scorer", "Scores", "VOTE_KEYS", "get", "workers"]
