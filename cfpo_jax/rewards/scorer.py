"""Scoring a batch with several reward functions: weights, per-function values, failure counts,
all in worker processes bounded in time and memory.

Every (item, function) pair runs in a `workers.WorkerPool` under a wall-clock deadline
(`timeout_s`; the worker is killed and replaced at `timeout_s + KILL_GRACE_S`) and an
address-space limit (`max_memory_gb`). A function that raises, returns something other than one
finite number, runs past its deadline or out of memory gives 0 for that item; the failure is
counted per function and the first one of each function is logged with its input. Nothing stops
the run, nothing fails silently. There is no in-process mode: a model's text reaches sympy only
inside a worker.

Across processes (`jax.distributed` initialised, more than one process), the host tasks are
split — process p scores tasks p, p + P, p + 2P, ... (hostile items spread out) — and the
(score, outcome) pairs are all-gathered, so every process ends with the same scores and so the
same advantages, each item scored once under one deadline. Every process must then call the
scorer with the same batch, as the trainer and the evaluation do.

The sandboxed functions (`registry.SANDBOXED`: `code`) run their untrusted part in a sandboxed
process per item with its own wall-clock limit, so they run in this process, all items of the
batch in parallel, not in a worker; an error of theirs (a malformed row, a sandbox that cannot
start) counts as a failure of every item of the batch.

A name "rm:<path or hub id>" is a learned reward model (`cfpo_jax.rewards.reward_model`): it is
loaded once on the device mesh in this process and scores the whole batch on device from the
prompts' chat messages (`prompt_messages`) and the completions, outside the item deadlines (its
shapes, not model output, bound its time and memory). A non-finite score counts as a failure.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from typing import Sequence

import numpy as np

from cfpo_jax.rewards import workers
from cfpo_jax.rewards.registry import REWARD_MODEL_PREFIX, SANDBOXED, implementation

log = logging.getLogger(__name__)

_LOGGED_INPUT_CHARS = 2000
_OUTCOMES = (None, "raised", "timeout", "killed")  # a task's kind, as gathered across processes


def _processes() -> tuple[int, int]:
    """(this process, number of processes) of an initialised jax.distributed run, else (0, 1)."""
    jax = sys.modules.get("jax")  # rewards never import JAX themselves
    if jax is None or not jax.distributed.is_initialized():
        return 0, 1
    return jax.process_index(), jax.process_count()


def _run_split(pool, tasks: list) -> list:
    """`pool.run` over this process's share of `tasks`, all-gathered into every task's result."""
    process, count = _processes()
    if count == 1:
        return pool.run(tasks)
    from jax.experimental import multihost_utils

    local = pool.run(tasks[process::count])
    width = -(-len(tasks) // count)
    packed = np.zeros((width, 2), np.float32)
    for j, (score, kind, _) in enumerate(local):
        packed[j] = (score, _OUTCOMES.index(kind))
    gathered = np.asarray(multihost_utils.process_allgather(packed))  # [count, width, 2]
    results = []
    for t in range(len(tasks)):
        p, j = t % count, t // count
        score, code = gathered[p, j]
        kind = _OUTCOMES[int(code)]
        message = local[j][2] if p == process else (f"{kind} on process {p}" if kind else None)
        results.append((float(score), kind, message))
    return results


class _InProcess:
    """`WorkerPool.run`'s interface for the SANDBOXED functions: each function once on all of
    its tasks, in this process."""

    def run(self, tasks: list) -> list:
        results = [None] * len(tasks)
        for name in dict.fromkeys(task[0] for task in tasks):
            items = [i for i, task in enumerate(tasks) if task[0] == name]
            fields = {f: [tasks[i][3][f] for i in items] for f in tasks[items[0]][3]}
            try:
                scores = SANDBOXED[name]([tasks[i][1] for i in items],
                                         [tasks[i][2] for i in items], **fields)
                outcomes = [(float(score), None, None) for score in scores]
            except Exception as e:  # noqa: BLE001  (counted and logged per item by the Scorer)
                outcomes = [(0.0, "raised", f"raised {type(e).__name__}: {e}")] * len(items)
            for i, outcome in zip(items, outcomes):
                results[i] = outcome
        return results


@dataclasses.dataclass(frozen=True)
class Scores:
    """Scores of one batch of B completions.

    total_B: float32 [B], Σ_f weight_f · per_fn[f].
    per_fn: function name → float32 [B], unweighted (0 where the function failed).
    failures: function name → number of items of this batch where it raised or timed out.
    """

    total_B: np.ndarray
    per_fn: dict[str, np.ndarray]
    failures: dict[str, int]

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Flat scalars for logging: mean/std of the total, mean and failures per function."""
        out = {f"{prefix}_mean": float(np.mean(self.total_B)),
               f"{prefix}_std": float(np.std(self.total_B))}
        for name, values_B in self.per_fn.items():
            out[f"{prefix}/{name}_mean"] = float(np.mean(values_B))
            out[f"{prefix}/{name}_failures"] = float(self.failures[name])
        return out


class Scorer:
    """Weighted reward functions, scored item by item in a bounded worker pool.

    fns: names from the registry or "package.module:function"; weights: one per function
    (default 1.0 each); num_workers: worker processes (>= 1); timeout_s: deadline per
    (function, item), wall seconds; max_memory_gb: each worker's address-space limit.
    `failure_totals` counts failures over the Scorer's life.
    """

    def __init__(self, fns: Sequence[str], weights: Sequence[float] | None = None, *,
                 num_workers: int = workers.DEFAULT_NUM_WORKERS,
                 timeout_s: float = workers.DEFAULT_TIMEOUT_S,
                 max_memory_gb: float = workers.DEFAULT_MAX_MEMORY_GB, mesh=None,
                 reward_model_kwargs: dict | None = None):
        fns = tuple(fns)
        weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(fns)
        if not fns or len(set(fns)) != len(fns):
            raise ValueError(f"reward fns must be a non-empty tuple of distinct names; got {fns}")
        if len(weights) != len(fns) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward weights {weights} must be {len(fns)} finite numbers, "
                             f"one per function {fns}")
        self.names, self.weights, self.timeout_s = fns, weights, float(timeout_s)
        self._host_names = tuple(name for name in fns if not name.startswith(REWARD_MODEL_PREFIX))
        for name in self._host_names:
            implementation(name)  # fails here, with the valid names, if one is bad
        self._reward_models = {}
        if len(self._host_names) < len(fns):
            from cfpo_jax.rewards import reward_model  # jax and the model code only when used

            self._reward_models = {
                name: reward_model.RewardModel(name[len(REWARD_MODEL_PREFIX):], mesh=mesh,
                                               **(reward_model_kwargs or {}))
                for name in fns if name not in self._host_names}
        pooled = tuple(name for name in self._host_names if name not in SANDBOXED)
        self._pool = (workers.WorkerPool(num_workers, timeout_s=timeout_s,
                                         max_memory_gb=max_memory_gb, preload=pooled)
                      if pooled else None)
        self.failure_totals = {name: 0 for name in fns}

    @classmethod
    def from_config(cls, rewards_config, *, mesh=None) -> "Scorer":
        """From `config.rewards` (fns, weights, num_workers, timeout_s, max_memory_gb, rm_*);
        reward models on `mesh`."""
        dtype = rewards_config.rm_dtype or None
        return cls(tuple(rewards_config.fns), tuple(rewards_config.weights),
                   num_workers=rewards_config.num_workers, timeout_s=rewards_config.timeout_s,
                   max_memory_gb=rewards_config.max_memory_gb, mesh=mesh,
                   reward_model_kwargs=dict(
                       param_dtype=dtype, dtype=dtype, max_len=rewards_config.rm_max_len,
                       batch_size=rewards_config.rm_batch_size))

    def __call__(self, completions: Sequence[str], answers: Sequence[str], *,
                 prompt_messages: Sequence[Sequence[dict]] | None = None,
                 **example_fields) -> Scores:
        """Scores B completions against their B gold answers; other fields are lists of B.
        `prompt_messages` (B chat-message lists, the conversation each completion answers) is
        needed by reward models only."""
        batch = len(completions)
        inputs = {"answers": answers, **example_fields}
        if self._reward_models:
            if prompt_messages is None:
                raise ValueError(f"reward models {sorted(self._reward_models)} need prompt_messages")
            inputs["prompt_messages"] = prompt_messages
        for name, values in inputs.items():
            if len(values) != batch:
                raise ValueError(f"{name} has {len(values)} entries for {batch} completions")
        by_name = {}
        for runner, names in ((self._pool, [n for n in self._host_names if n not in SANDBOXED]),
                              (_InProcess(), [n for n in self._host_names if n in SANDBOXED])):
            tasks = [(name, completions[i], answers[i],
                      {f: v[i] for f, v in example_fields.items()})
                     for name in names for i in range(batch)]
            results = _run_split(runner, tasks) if tasks else []
            by_name.update({name: results[k * batch:(k + 1) * batch]
                            for k, name in enumerate(names)})
        for name, model in self._reward_models.items():
            values = model(prompt_messages, completions)
            by_name[name] = [(float(v), None, None) if np.isfinite(v) else
                             (0.0, "raised", f"reward model scored {v}") for v in values]
        per_fn, failures = {}, {}
        for name in self.names:
            chunk = by_name[name]
            per_fn[name] = np.asarray([score for score, _, _ in chunk], np.float32)
            failed = [i for i, (_, kind, _) in enumerate(chunk) if kind is not None]
            failures[name] = len(failed)
            if failed and self.failure_totals[name] == 0:
                i = failed[0]
                log.warning(
                    "reward %r failed on item %d and scores 0 there (failures are counted in "
                    "reward/%s_failures): %s\n  completion (%d chars): %r\n  answer: %r",
                    name, i, name, chunk[i][2], len(completions[i]),
                    completions[i][:_LOGGED_INPUT_CHARS], answers[i])
            self.failure_totals[name] += len(failed)
        total_B = sum(w * per_fn[name] for name, w in zip(self.names, self.weights))
        return Scores(np.asarray(total_B, np.float32), per_fn, failures)

    def close(self):
        if self._pool is not None:
            self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
