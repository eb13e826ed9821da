"""The verdict of a code row: the test's assertions, in the launcher's process, outside the sandbox.

The candidate's code runs in the sandbox (sandbox_server.py); here the test's source runs with
each of the candidate's functions replaced by a `_Proxy` that sends the call's arguments and
receives the result as plain data (sandbox_wire). So nothing the candidate's code does — a
tracer, a frame walk, a gc search, monkeypatching, an object whose `__eq__` says True, its exit
code, its printed text, its file descriptors — can reach the assertions or the values they
compare with, which never enter the sandbox.

HumanEval form: the row's `prompt` (trusted: the dataset's signature and helpers, e.g.
HumanEval/32's `poly`) and `test` run here, then `check(<proxy of entry_point>)`. MBPP form: the
assert statements run here. In both, each name the test uses that the prompt, the test itself,
the builtins or the standard library do not define is a proxy of the candidate's function of
that name (without the prompt, HumanEval/32's `poly` is the candidate's).

Standard library only, no import of cfpo_jax (the launcher runs with `python -I -S`).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import sys

try:
    from cfpo_jax import sandbox_wire as wire
except ImportError:  # in the launcher (python -I -S): beside it on sys.path
    import sandbox_wire as wire

_ANSWER_CAP = 64 << 20


class _Abort(BaseException):
    """The candidate's side broke the protocol or ran out of time: the row fails, and the test
    cannot catch it with `except Exception`."""


class CandidateError(Exception):
    """The candidate's function raised something that is not a built-in exception."""


def _exception(name: str, message: str) -> Exception:
    kind = getattr(builtins, name, None) if isinstance(name, str) else None
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # noqa: BLE001  (e.g. UnicodeDecodeError needs five arguments)
            pass
    return CandidateError(f"{name}: {message}")


class _Channel:
    def __init__(self, requests: int, answers: int, deadline: float):
        self.requests, self.answers, self.deadline = requests, answers, deadline
        self.broken: str | None = None
        self.last = "none"  # the last answer, for the verdict's why

    def receive(self):
        try:
            answer = wire.decode(wire.read_frame(self.answers, cap=_ANSWER_CAP,
                                                 deadline=self.deadline))
        except wire.WireError as e:
            self.broken = str(e)
            raise _Abort(self.broken) from None
        self.last = repr(answer)[:200]
        if type(answer) is list and len(answer) == 2 and answer[0] == "ok":
            return answer[1]
        if type(answer) is list and len(answer) == 3 and answer[0] == "raise":
            raise _exception(answer[1], answer[2] if type(answer[2]) is str else "")
        self.broken = f"a malformed answer: {str(answer)[:200]}"
        raise _Abort(self.broken)


class _Proxy:
    """Stands for the candidate's function `name`: plain data in, plain data out."""

    def __init__(self, channel: _Channel, name: str):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        if self._channel.broken:
            raise _Abort(self._channel.broken)
        try:
            request = wire.encode([self.__name__, list(args), kwargs])
        except wire.WireError as e:
            raise TypeError(f"{self.__name__}: the test's arguments cannot cross: {e}") from None
        try:
            wire.write_frame(self._channel.requests, request)
        except OSError as e:
            self._channel.broken = f"the candidate's side is gone: {e}"
            raise _Abort(self._channel.broken) from None
        return self._channel.receive()

    def __repr__(self):
        return f"<candidate {self.__name__}>"


def free_names(tree: ast.AST) -> list[str]:
    """Names the statements load without binding them (in order of first use)."""
    bound, loaded = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                loaded.setdefault(node.id, None)
            else:
                bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return [name for name in loaded if name not in bound]


def _bind_free_names(tree: ast.AST, namespace: dict, channel: _Channel):
    """Each name the test uses and nothing defines: a standard-library module imported, else a
    proxy of the candidate's function of that name."""
    for name in free_names(tree):
        if hasattr(builtins, name) or name in namespace:
            continue
        if name in sys.stdlib_module_names:
            namespace[name] = importlib.import_module(name)
        else:
            namespace[name] = _Proxy(channel, name)


def judge(spec: dict, requests: int, answers: int, deadline: float) -> tuple[bool, str]:
    """(passed, why not) for one row; `deadline` is time.monotonic() for the whole verdict."""
    channel = _Channel(requests, answers, deadline)
    namespace = {"__name__": "__verdict__"}
    try:
        channel.receive()  # the candidate's code ran to its end
    except (_Abort, Exception) as e:  # noqa: BLE001
        return False, f"the code failed: {type(e).__name__}: {e}"
    try:
        if spec.get("test") is not None:
            if spec.get("prompt"):
                try:  # its helpers (HumanEval/32's poly, /38's encode_cyclic) are the dataset's
                    exec(compile(spec["prompt"], "<prompt>", "exec"), namespace)
                except Exception:  # noqa: BLE001  (a prompt that is not a program)
                    pass
            tree = ast.parse(spec["test"], "<test>")
            _bind_free_names(tree, namespace, channel)  # helpers the prompt did not define
            exec(compile(tree, "<test>", "exec"), namespace)
            candidate = _Proxy(channel, spec["entry_point"])
            namespace[spec["entry_point"]] = candidate
            namespace["check"](candidate)
        else:
            tree = ast.parse(spec["tests"], "<tests>")
            _bind_free_names(tree, namespace, channel)
            exec(compile(tree, "<tests>", "exec"), namespace)
    except _Abort as e:
        return False, f"the candidate's side: {e}"
    except BaseException as e:  # noqa: BLE001  (an assertion, the candidate's exception, ...)
        return False, (f"{type(e).__name__}: {str(e)[:200]} (the candidate's last answer: "
                       f"{channel.last})")
    if channel.broken:  # the test caught an _Abort with a bare except
        return False, f"the candidate's side: {channel.broken}"
    return True, ""
