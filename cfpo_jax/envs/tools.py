"""Tools by name: the built-ins ("calculator", "python") or a user function "package.module:function".

A tool is a function of keyword arguments returning its result as text (or a `ToolResult`,
to report an error or a time-out itself). Its JSON schema, which chat templates show the model
("hermes", "llama3" formats), comes from its signature and Google-style docstring
(`transformers.utils.get_json_schema`). A call written as bare text (the "tag" format,
Llama's `<|python_tag|>`) passes that text as the first parameter.

`call` bounds every call: it runs the function in a daemon thread and stops waiting after
`timeout_s` (the answer is then a time-out), and it cuts the result to `max_chars`. A Python
thread cannot be killed, so a pure-Python tool that never returns keeps its thread until the
process ends — tools that run untrusted input run it in a separate process: "python" runs code
in `cfpo_jax.sandbox`, which kills it at its own limits.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import operator
import threading
import time
from typing import Callable

from cfpo_jax import user_functions


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call gave: `text` for the model; `error` (the call failed, or could not be made)
    and `timed_out`; `seconds` of wall time."""

    text: str
    error: bool = False
    timed_out: bool = False
    seconds: float = 0.0


# ----------------------------------------------------------------------------- built-ins

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
              ast.Pow: operator.pow}
_MAX_EXPONENT = 64
_MAX_MAGNITUDE = 10 ** 100


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "347 * 28".
    """
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            return value(node.operand) if isinstance(node.op, ast.UAdd) else -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {_MAX_EXPONENT}")
            result = _OPERATORS[type(node.op)](left, right)
            if abs(result) > _MAX_MAGNITUDE:
                raise ValueError("the result is too large")
            return result
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    result = value(tree.body)
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result)


def python(code: str) -> ToolResult:
    """Runs Python code in a sandbox and returns what it printed.

    Args:
        code: a Python program; print what you want to see.
    """
    from cfpo_jax import sandbox  # only a run that uses the tool needs the sandbox

    result = sandbox.run_python(code)
    if result.ok:
        return ToolResult(result.stdout, seconds=result.seconds)
    reason = "timed out" if result.timed_out else (
        f"killed by {result.killed_by}" if result.killed_by else f"exit code {result.exit_code}")
    text = (result.stdout + result.stderr).rstrip() + f"\n({reason})"
    return ToolResult(text.lstrip(), error=True, timed_out=bool(result.timed_out), seconds=result.seconds)


BUILTINS: dict[str, Callable] = {"calculator": calculator, "python": python}


# ----------------------------------------------------------------------------- lookup and calls


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str  # what the model calls it: the function's name
    fn: Callable
    first_parameter: str

    def schema(self) -> dict:
        """The JSON schema chat templates show the model (from the signature and docstring)."""
        from transformers.utils import get_json_schema

        try:
            return get_json_schema(self.fn)
        except Exception as e:  # transformers raises its own DocstringParsingException
            raise ValueError(f"tool {self.name!r}: chat templates need its JSON schema, read from a "
                             f"Google-style docstring with an Args section: {e}") from e


def get(name: str) -> Tool:
    """The built-in tool `name`, or the user function "package.module:function"."""
    fn = user_functions.resolve(name, BUILTINS, "tool")
    parameters = list(inspect.signature(fn).parameters)
    if not parameters:
        raise ValueError(f"tool {name!r} takes no parameters; a tool takes at least one")
    return Tool(name=fn.__name__, fn=fn, first_parameter=parameters[0])


def call(tool: Tool, *, arguments: dict | None = None, text: str | None = None, timeout_s: float,
         max_chars: int) -> ToolResult:
    """Calls `tool` with keyword `arguments` or with `text` as its first parameter, bounded as the
    module doc says; an exception is an error result naming it, never raised."""
    kwargs = dict(arguments or {}) if text is None else {tool.first_parameter: text}
    box: dict = {}

    def target():
        try:
            box["value"] = tool.fn(**kwargs)
        except BaseException as e:  # a tool's failure is the model's observation
            box["error"] = e

    start = time.monotonic()
    thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    seconds = time.monotonic() - start
    if thread.is_alive():
        return ToolResult(f"error: {tool.name} timed out after {timeout_s:g} s", error=True,
                          timed_out=True, seconds=seconds)
    if "error" in box:
        e = box["error"]
        return ToolResult(_cut(f"error: {type(e).__name__}: {e}", max_chars), error=True, seconds=seconds)
    value = box["value"]
    if isinstance(value, ToolResult):
        return dataclasses.replace(value, text=_cut(value.text, max_chars), seconds=seconds)
    return ToolResult(_cut(str(value), max_chars), seconds=seconds)


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n... ({len(text) - max_chars} more characters cut)"
