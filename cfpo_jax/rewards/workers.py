"""Worker processes that score rewards under a deadline and an address-space limit.

Model output is hostile by accident: one completion can make sympy run for minutes or grow past
the machine's memory (`9^{9^{9^{9}}}` is a single uninterruptible big-integer power). So reward
functions never run in the trainer's process. Each worker is a fresh Python interpreter (a plain
subprocess: forking a process that runs JAX threads is unsafe, and multiprocessing's spawn would
re-import the trainer's `__main__`, JAX included, in every worker) that

* sets `RLIMIT_AS` to `max_memory_gb` before importing anything, so an allocation past it fails
  (Python's MemoryError, or GMP aborting the process) instead of growing the machine's memory;
* scores one (function, item) task at a time under a `SIGALRM` timer of `timeout_s` that raises
  `RewardTimeout`, a BaseException, so that the many `except Exception` clauses in math-verify
  and sympy cannot swallow it (math-verify's own `signal.alarm` timeouts are off: each of its
  calls would cancel this timer);
* exits after a MemoryError (its heap is suspect) and is then replaced.

The parent kills a worker whose task has run `timeout_s + KILL_GRACE_S` wall seconds (a long C
call the timer cannot interrupt) and starts a fresh one, so every item is answered within
`timeout_s + KILL_GRACE_S` of being handed out. A task's outcome is `(score, kind, message)`:
kind None (scored), "raised", "timeout", "killed" (stuck, or died, e.g. out of memory).

Workers resolve functions by name (registry or "package.module:function") with the parent's
`sys.path`, so user reward functions must be importable, not closures.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing import connection
from typing import Sequence

import numpy as np

from cfpo_jax.rewards import registry

DEFAULT_NUM_WORKERS = 2
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_MEMORY_GB = 2.0
KILL_GRACE_S = 0.5
# A worker imports math-verify/sympy (and the user's module) before it reports ready.
WORKER_START_TIMEOUT_S = 300.0
# The timer refires until disarmed: a RewardTimeout raised where exceptions are swallowed (a bare
# `except:`, a gc callback, printed as "Exception ignored in") is raised again.
_REFIRE_S = 0.05

_in_worker = False


def in_worker() -> bool:
    """True inside a reward worker, where functions run in-process (already bounded)."""
    return _in_worker


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
    """`fn` on one item in this (main) thread under a `timeout_s` deadline: (score, kind, message)."""
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
            return 0.0, "raised", f"returned {values!r} for one item; expected one finite number"
        return float(values[0]), None, None
    except RewardTimeout:
        return 0.0, "timeout", f"timed out after {timeout_s} s"
    except MemoryError:
        return 0.0, "killed", "out of memory (the worker's address-space limit)"
    except Exception as e:  # a reward function's bug must not stop the run; it is counted
        return 0.0, "raised", f"raised {type(e).__name__}: {e}"
    finally:
        signal.signal(signal.SIGALRM, previous)


def _worker_main(fd: int, timeout_s: float):
    """The worker's loop (RLIMIT_AS is already set by the boot line)."""
    global _in_worker
    _in_worker = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    conn = connection.Connection(fd)
    fns = {}
    # Imports happen here, before "ready", not inside the first item's deadline.
    for name in conn.recv():
        try:
            fns[name] = registry.implementation(name)
        except Exception:  # noqa: BLE001  (reported as a failure of each item that uses it)
            pass
    try:
        import math_verify  # noqa: F401
    except ImportError:
        pass
    conn.send("ready")
    try:
        while (task := conn.recv()) is not None:
            name, completion, answer, fields = task
            try:
                fn = fns[name] if name in fns else fns.setdefault(name, registry.implementation(name))
            except Exception as e:  # noqa: BLE001  (reported as this item's failure)
                conn.send((0.0, "raised", f"{type(e).__name__}: {e}"))
                continue
            result = score_item(fn, completion, answer, fields, timeout_s)
            conn.send(result)
            if result[1] == "killed":  # out of memory: let the parent start a clean worker
                return
    except (EOFError, OSError):  # the parent went away
        pass


_BOOT = ("import resource, sys; limit = int(sys.argv[2]); "
         "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
         "from cfpo_jax.rewards.workers import _worker_main; "
         "_worker_main(int(sys.argv[1]), float(sys.argv[3]))")


def _worker_env() -> dict:
    path = [p or os.getcwd() for p in sys.path]
    # One thread per math library: each thread's arena and stack count against RLIMIT_AS.
    threads = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), **threads)


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    conn: connection.Connection
    started: float
    ready: bool = False
    task: int | None = None
    task_started: float = 0.0


def _stop(workers):
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        try:
            w.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        w.conn.close()


class WorkerPool:
    """`num_workers` processes scoring (function name, completion, answer, fields) tasks; a worker
    that dies or is killed is replaced at once (its imports then take a moment, on the next task's
    time only if no other worker is free)."""

    def __init__(self, num_workers: int = DEFAULT_NUM_WORKERS, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_memory_gb: float = DEFAULT_MAX_MEMORY_GB, preload: Sequence[str] = ()):
        if num_workers < 1 or not timeout_s > 0 or not max_memory_gb > 0:
            raise ValueError(f"need num_workers >= 1, timeout_s > 0 and max_memory_gb > 0; got "
                             f"{num_workers}, {timeout_s}, {max_memory_gb}")
        self.timeout_s, self.max_memory_gb = float(timeout_s), float(max_memory_gb)
        self._preload = tuple(preload)  # function names each worker imports before it is ready
        self._lock = threading.Lock()  # one batch at a time (direct calls may come from threads)
        self._workers = [self._start() for _ in range(num_workers)]
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop, self._workers)

    def _start(self) -> _Worker:
        parent, child = connection.Pipe()
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(child.fileno()),
             str(int(self.max_memory_gb * 2**30)), repr(self.timeout_s)],
            pass_fds=[child.fileno()], env=_worker_env(), stdin=subprocess.DEVNULL)
        child.close()
        parent.send(self._preload)
        return _Worker(proc, parent, started=time.monotonic())

    def _replace(self, w: _Worker):
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()
        w.conn.close()
        self._workers[self._workers.index(w)] = self._start()

    def run(self, tasks: Sequence[tuple]) -> list[tuple[float, str | None, str | None]]:
        """(score, kind, message) per task, in order; each within timeout_s + KILL_GRACE_S of
        being handed to a worker."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the reward worker pool is closed")
            return self._run(list(tasks))

    def wait_ready(self):
        """Blocks until every worker has started (e.g. after replacements)."""
        with self._lock:
            self._run([], until_ready=True)

    def _run(self, tasks, until_ready=False):
        results: list = [None] * len(tasks)
        queue = collections.deque(range(len(tasks)))
        kill_after = self.timeout_s + KILL_GRACE_S
        while queue or any(w.task is not None or (until_ready and not w.ready)
                           for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and queue:
                    w.task, w.task_started = queue.popleft(), time.monotonic()
                    try:
                        w.conn.send(tasks[w.task])
                    except OSError:  # it died between tasks: the task goes back to the queue
                        queue.appendleft(w.task)
                        self._replace(w)
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
            code = w.proc.wait()
            if not w.ready:
                raise RuntimeError(
                    f"reward worker exited with code {code} while starting (under an "
                    f"address-space limit of max_memory_gb={self.max_memory_gb}: too small?)"
                ) from None
            if w.task is not None:
                results[w.task] = (0.0, "killed", f"reward worker died (exit code {code})")
            self._replace(w)
            return
        if message == "ready":
            w.ready = True
        elif message is not None:
            results[w.task], w.task = message, None
            if message[1] == "killed":  # out of memory: the worker exits, a clean one replaces it
                self._replace(w)
        elif not w.ready and now > w.started + WORKER_START_TIMEOUT_S:
            raise RuntimeError(f"reward worker not ready after {WORKER_START_TIMEOUT_S} s")
        elif w.task is not None and now > w.task_started + kill_after:
            results[w.task] = (0.0, "killed", f"killed after {kill_after:.1f} s "
                                              "(stuck outside Python)")
            self._replace(w)

    def close(self):
        with self._lock:
            self._closed = True
            self._finalizer()


_shared: WorkerPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> WorkerPool:
    """The process-wide pool (default settings) that registered functions use when called
    directly; started on first use, closed at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = WorkerPool()
            atexit.register(_shared.close)
        return _shared


def get(name: str) -> registry.RewardFn:
    """The reward function `name` as a caller outside a worker calls it: a built-in of
    `registry.IMPLEMENTATIONS` bounded item by item in the shared pool (its own error — a gold
    answer it cannot read — raises ValueError); a SANDBOXED one or a user function as it is."""
    if name not in registry.IMPLEMENTATIONS:
        return registry.implementation(name)

    def fn(completions: list[str], answers: list[str], **example_fields) -> np.ndarray:
        if in_worker():
            return registry.IMPLEMENTATIONS[name](completions, answers, **example_fields)
        for field, values in {"answers": answers, **example_fields}.items():
            if len(values) != len(completions):
                raise ValueError(f"got {len(completions)} completions but {len(values)} "
                                 f"{field}; they pair up")
        results = shared_pool().run(
            [(name, completion, answer, {f: v[i] for f, v in example_fields.items()})
             for i, (completion, answer) in enumerate(zip(completions, answers))])
        raised = [message for _, kind, message in results if kind == "raised"]
        if raised:  # the function's own error (a gold answer it cannot read), not the text's
            raise ValueError(f"reward {name!r}: {raised[0]}")
        return np.asarray([score for score, _, _ in results], np.float32)

    fn.__name__ = name
    fn.__doc__ = registry.IMPLEMENTATIONS[name].__doc__
    return fn
