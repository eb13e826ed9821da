"""Reward functions, tools and environments are named the same way: a built-in's name, or a user
function as "package.module:function" (imported when the run starts, so a typo fails at once)."""

from __future__ import annotations

import importlib
from typing import Callable


def resolve(name: str, builtins: dict, kind: str) -> Callable:
    """`builtins[name]`, or the callable "package.module:function"; `kind` ("tool", "reward
    function", ...) names what was asked for in the errors, which list the valid names."""
    if name in builtins:
        return builtins[name]
    if ":" not in name:
        raise ValueError(f"unknown {kind} {name!r}; valid: {sorted(builtins)} or 'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{kind} {name!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{kind} {name!r}: module {module_name!r} has no function {attr!r}")
    return fn
