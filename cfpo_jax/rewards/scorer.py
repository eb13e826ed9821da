"""Scoring a batch with several reward functions: weights, per-function values, failure counts,
and timeouts that really apply.

Every (item, function) pair runs under a wall-clock deadline (`timeout_s`). A function that
raises, returns something other than one finite number, or runs past its deadline gives 0 for
that item; the failure is counted per function and the first one of each function is logged
with its input. Nothing stops the run, nothing fails silently.

Two ways to run, `num_workers`:

* 0 — in the calling thread, which must be the main thread: the deadline is a `SIGALRM` timer
  (`setitimer`) that raises `RewardTimeout`, a BaseException, so that the many `except
  Exception` clauses in math-verify and sympy cannot swallow it. math-verify's own
  `signal.alarm` timeouts are switched off: each of its calls would cancel this timer. A timer
  cannot interrupt one long C-level call — sympy evaluating `9^{9^{9^{9}}}` is a single
  uninterruptible big-integer power — so use this mode only for trusted text (tests, reference
  solutions), not for model output.
* > 0 — a pool of spawned worker processes (spawn: forking a process that runs JAX threads is
  unsafe). Each worker scores one item at a time under the same timer, and the parent kills a
  worker whose item has run `timeout_s + KILL_GRACE_S` wall seconds and starts a fresh one, so
  even an uninterruptible computation ends. This is the mode for model output.

Workers resolve the functions by name (registry or "package.module:function"), so user reward
functions must be importable, not closures.

A name "rm:<path or hub id>" is a learned reward model (`cfpo_jax.rewards.reward_model`): it is
loaded once on the device mesh in this process and scores the whole batch on device from the
prompts' chat messages (`prompt_messages`) and the completions, outside the item deadlines (its
shapes, not model output, bound its time and memory). A non-finite score counts as a failure.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import multiprocessing
import signal
import threading
import time
import weakref
from multiprocessing import connection
from typing import Sequence

import numpy as np

from cfpo_jax.rewards.registry import REWARD_MODEL_PREFIX, get

log = logging.getLogger(__name__)

KILL_GRACE_S = 1.0
# A worker imports math-verify/sympy (and the user's module) before it reports ready.
WORKER_START_TIMEOUT_S = 300.0
# The timer refires until disarmed: a RewardTimeout raised where exceptions are swallowed (a bare
# `except:`, a gc callback such as JAX's, printed as "Exception ignored in") is raised again.
_REFIRE_S = 0.05
_LOGGED_INPUT_CHARS = 2000


class RewardTimeout(BaseException):
    """The deadline of one reward item passed (BaseException: reward code must not catch it)."""


_armed = False


def _on_alarm(signum, frame):
    del signum, frame
    if _armed:
        raise RewardTimeout()


def _disarm():
    global _armed
    # A signal landing while we disarm raises here; retry until the timer is really off.
    while True:
        try:
            _armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except RewardTimeout:
            continue


def score_item(fn, completion: str, answer: str, fields: dict, timeout_s: float):
    """`fn` on one item in the main thread under a `timeout_s` deadline: (score, None) or
    (0.0, reason)."""
    global _armed
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        try:
            _armed = True
            signal.setitimer(signal.ITIMER_REAL, timeout_s, _REFIRE_S)
            values = fn([completion], [answer], **{k: [v] for k, v in fields.items()})
        finally:
            _disarm()
        values = np.asarray(values, np.float32).reshape(-1)
        if values.shape != (1,) or not np.isfinite(values[0]):
            return 0.0, f"returned {values!r} for one item; expected one finite number"
        return float(values[0]), None
    except RewardTimeout:
        return 0.0, f"timed out after {timeout_s} s"
    except Exception as e:  # a reward function's bug must not stop the run; it is counted
        return 0.0, f"raised {type(e).__name__}: {e}"
    finally:
        signal.signal(signal.SIGALRM, previous)


def _worker_main(conn, fn_names, timeout_s):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    fns = [get(name) for name in fn_names]
    conn.send("ready")
    try:
        while (task := conn.recv()) is not None:
            k, completion, answer, fields = task
            conn.send(score_item(fns[k], completion, answer, fields, timeout_s))
    except (EOFError, OSError):  # the parent went away
        pass


@dataclasses.dataclass
class _Worker:
    proc: multiprocessing.Process
    conn: connection.Connection
    started: float
    ready: bool = False
    task: int | None = None
    task_started: float = 0.0


def _shutdown(workers):
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        w.proc.join(timeout=1.0)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()


class _WorkerPool:
    """Spawned processes scoring one (function, item) task at a time; stuck ones are killed."""

    def __init__(self, fn_names: Sequence[str], num_workers: int, timeout_s: float):
        self._ctx = multiprocessing.get_context("spawn")
        self._fn_names = tuple(fn_names)
        self._timeout_s = timeout_s
        self._workers = [self._start() for _ in range(num_workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._fn_names, self._timeout_s),
                                 daemon=True, name="cfpo-reward-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent, started=time.monotonic())

    def _replace(self, w: _Worker):
        w.proc.kill()
        w.proc.join()
        w.conn.close()
        self._workers[self._workers.index(w)] = self._start()

    def run(self, tasks: list[tuple]) -> list[tuple[float, str | None]]:
        results: list = [None] * len(tasks)
        queue = collections.deque(range(len(tasks)))
        kill_after = self._timeout_s + KILL_GRACE_S
        while queue or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and queue:
                    w.task, w.task_started = queue.popleft(), time.monotonic()
                    w.conn.send(tasks[w.task])
            # Idle workers set no deadline (at a batch's tail they would make this loop spin).
            deadlines = [w.started + WORKER_START_TIMEOUT_S if not w.ready else
                         w.task_started + kill_after for w in self._workers
                         if not w.ready or w.task is not None]
            wait_s = max(min(deadlines, default=0.0) - time.monotonic(), 0.0)
            connection.wait([w.conn for w in self._workers], wait_s)
            for w in list(self._workers):
                self._collect(w, results, kill_after)
        return results

    def _collect(self, w: _Worker, results: list, kill_after: float):
        now = time.monotonic()
        try:
            message = w.conn.recv() if w.conn.poll() else None
        except (EOFError, OSError):
            w.proc.join(timeout=1.0)
            if not w.ready:
                raise RuntimeError(
                    f"reward worker exited with code {w.proc.exitcode} while importing "
                    f"{self._fn_names}; run one in the main thread (num_workers=0) to see why"
                ) from None
            results[w.task] = (0.0, f"reward worker died (exit code {w.proc.exitcode})")
            self._replace(w)
            return
        if message == "ready":
            w.ready = True
        elif message is not None:
            results[w.task], w.task = message, None
        elif not w.ready and now > w.started + WORKER_START_TIMEOUT_S:
            raise RuntimeError(f"reward worker not ready after {WORKER_START_TIMEOUT_S} s")
        elif w.task is not None and now > w.task_started + kill_after:
            results[w.task] = (0.0, f"killed after {kill_after:.1f} s (stuck outside Python)")
            self._replace(w)

    def close(self):
        self._finalizer()


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
    """Weighted reward functions, scored item by item under a deadline.

    fns: names from the registry or "package.module:function"; weights: one per function
    (default 1.0 each); num_workers: 0 = main thread, else a process pool; timeout_s: deadline
    per (function, item), wall seconds. `failure_totals` counts failures over the Scorer's life.
    "rm:<path>" names are reward models placed on `mesh`, built with `reward_model_kwargs`
    (param_dtype, dtype, max_len, batch_size of `reward_model.RewardModel`).
    """

    def __init__(self, fns: Sequence[str], weights: Sequence[float] | None = None, *,
                 num_workers: int = 0, timeout_s: float = 10.0, mesh=None,
                 reward_model_kwargs: dict | None = None):
        fns = tuple(fns)
        weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(fns)
        if not fns or len(set(fns)) != len(fns):
            raise ValueError(f"reward fns must be a non-empty tuple of distinct names; got {fns}")
        if len(weights) != len(fns) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward weights {weights} must be {len(fns)} finite numbers, "
                             f"one per function {fns}")
        if num_workers < 0 or not timeout_s > 0:
            raise ValueError(f"need num_workers >= 0 and timeout_s > 0; got {num_workers}, "
                             f"{timeout_s}")
        self.names, self.weights, self.timeout_s = fns, weights, float(timeout_s)
        self._host_names = tuple(name for name in fns if not name.startswith(REWARD_MODEL_PREFIX))
        # fails here, with the valid names, if one is bad
        self._fns = [get(name) for name in self._host_names]
        self._reward_models = {}
        if len(self._host_names) < len(fns):
            from cfpo_jax.rewards import reward_model  # jax and the model code only when used

            self._reward_models = {
                name: reward_model.RewardModel(name[len(REWARD_MODEL_PREFIX):], mesh=mesh,
                                               **(reward_model_kwargs or {}))
                for name in fns if name not in self._host_names}
        self._pool = (_WorkerPool(self._host_names, num_workers, self.timeout_s)
                      if num_workers and self._host_names else None)
        self.failure_totals = {name: 0 for name in fns}

    @classmethod
    def from_config(cls, rewards_config, *, mesh=None) -> "Scorer":
        """From `config.rewards` (fns, weights, num_workers, timeout_s, rm_*); reward models on `mesh`."""
        dtype = rewards_config.rm_dtype or None
        return cls(tuple(rewards_config.fns), tuple(rewards_config.weights),
                   num_workers=rewards_config.num_workers, timeout_s=rewards_config.timeout_s,
                   mesh=mesh, reward_model_kwargs=dict(
                       param_dtype=dtype, dtype=dtype, max_len=rewards_config.rm_max_len,
                       batch_size=rewards_config.rm_batch_size))

    def __call__(self, completions: Sequence[str], answers: Sequence[str], *,
                 prompt_messages: Sequence[Sequence[dict]] | None = None, **example_fields) -> Scores:
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
        tasks = [(k, completions[i], answers[i], {f: v[i] for f, v in example_fields.items()})
                 for k in range(len(self._fns)) for i in range(batch)]
        if self._pool is not None:
            results = self._pool.run(tasks)
        else:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("rewards with num_workers=0 must be scored in the main thread "
                                   "(their deadline is a SIGALRM timer); set num_workers > 0")
            results = [score_item(self._fns[k], c, a, f, self.timeout_s) for k, c, a, f in tasks]
        by_name = {name: results[k * batch:(k + 1) * batch] for k, name in enumerate(self._host_names)}
        for name, model in self._reward_models.items():
            values = model(prompt_messages, completions)
            by_name[name] = [(float(v), None) if np.isfinite(v) else (0.0, f"reward model scored {v}")
                             for v in values]
        per_fn, failures = {}, {}
        for name in self.names:
            chunk = by_name[name]
            per_fn[name] = np.asarray([score for score, _ in chunk], np.float32)
            failed = [i for i, (_, reason) in enumerate(chunk) if reason is not None]
            failures[name] = len(failed)
            if failed and self.failure_totals[name] == 0:
                i = failed[0]
                log.warning(
                    "reward %r failed on item %d and scores 0 there (failures are counted in "
                    "reward/%s_failures): %s\n  completion (%d chars): %r\n  answer: %r",
                    name, i, name, chunk[i][1], len(completions[i]),
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
