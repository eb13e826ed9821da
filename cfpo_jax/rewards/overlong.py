"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a length penalty added to the reward.

With L_max = the generation budget (`sampling.max_new_tokens`), L_buf = `rewards.overlong_buffer`
and the factor p = `rewards.overlong_penalty`, a response of |y| tokens gets

    R_len(y) = 0                                    if |y| ≤ L_max − L_buf
             = −p · (|y| − (L_max − L_buf)) / L_buf  if L_max − L_buf < |y| ≤ L_max

so the penalty grows linearly over the last L_buf tokens, to −p at the budget (a truncated
response has |y| = L_max). This is verl's DAPO reward manager's formula. It runs on the host
after the reward functions, on the completion lengths the rollout already has, and is logged on
its own (`overlong_penalty_mean`, `overlong_penalised_frac`) besides the reward it is added to.
`overlong_buffer = 0` turns it off. In a multi-turn episode |y| is the whole completion after the
prompt (tool answers included), what the budget counts.
"""

from __future__ import annotations

import numpy as np


def overlong_penalty(lengths_B, max_len: int, buffer: int, penalty: float) -> np.ndarray:
    """R_len of each response, float32 [B] (≤ 0); zeros when `buffer` is 0."""
    lengths_B = np.asarray(lengths_B, np.float64)
    if buffer == 0:
        return np.zeros(lengths_B.shape, np.float32)
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in [0, {max_len}] (the budget); got {buffer}")
    if penalty < 0:
        raise ValueError(f"overlong penalty must be >= 0; got {penalty}")
    exceed_B = np.maximum(lengths_B - (max_len - buffer), 0.0)
    return (-penalty * exceed_B / buffer).astype(np.float32)


def shape_rewards(reward_B, lengths_B, *, max_len: int, buffer: int, penalty: float):
    """(reward + R_len [B] float32, metrics): the shaped reward and what the penalty did."""
    penalty_B = overlong_penalty(lengths_B, max_len, buffer, penalty)
    metrics = dict(overlong_penalty_mean=float(penalty_B.mean()),
                   overlong_penalised_frac=float(np.mean(penalty_B < 0)))
    return np.asarray(reward_B, np.float32) + penalty_B, metrics
