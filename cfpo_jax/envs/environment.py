"""Environments: an episode over one dataset example, answering each model turn.

An environment is made per episode by a factory `make(example, tools) -> environment`, named in
`config.env.name` as "tools" (the built-in `ToolEnv`) or a user "package.module:function". The
environment's one method, `step(turn) -> list[Message] | None`, answers a model turn with
messages (role "tool": a tool's result; role "user": feedback) or None to end the episode.
`tools` (`EpisodeTools`) runs the configured tools within their limits and counts calls, errors
and time-outs for the step's metrics; an environment calls tools only through it.

The rollout (`cfpo_jax.envs.rollout`), not the environment, enforces `max_turns` and the token
budget; the reward functions score the finished episode's text as usual.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

from cfpo_jax import user_functions
from cfpo_jax.envs import tools as tools_lib
from cfpo_jax.envs.formats import Message, ToolCall


@dataclasses.dataclass(frozen=True)
class Turn:
    """A model turn: its 1-based `index`, its `text` (decoded with special tokens) and the tool
    `calls` the format found in it."""

    index: int
    text: str
    calls: tuple[ToolCall, ...]


class Environment(Protocol):
    def step(self, turn: Turn) -> list[Message] | None: ...


class EpisodeTools:
    """The configured tools for one episode, with limits and counters (calls, errors, time-outs,
    seconds)."""

    def __init__(self, tools: list[tools_lib.Tool], *, timeout_s: float, max_chars: int):
        self.tools = {tool.name: tool for tool in tools}
        self.default = tools[0] if tools else None
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self.calls = self.errors = self.timeouts = 0
        self.seconds = 0.0

    def call(self, call: ToolCall) -> Message:
        """Runs one call (its error when it could not be read or names no configured tool)."""
        self.calls += 1
        tool = self.default if call.name is None else self.tools.get(call.name)
        if call.error is not None:
            result = tools_lib.ToolResult(f"error: {call.error}", error=True)
        elif tool is None:
            result = tools_lib.ToolResult(
                f"error: no tool {call.name!r}; the tools are {sorted(self.tools)}", error=True)
        else:
            result = tools_lib.call(tool, arguments=call.arguments, text=call.text,
                                    timeout_s=self.timeout_s, max_chars=self.max_chars)
        self.errors += result.error
        self.timeouts += result.timed_out
        self.seconds += result.seconds
        return Message("tool", result.text)


class ToolEnv:
    """The built-in environment: runs every tool call of a turn and answers with the results, in
    order; a turn without a tool call ends the episode."""

    def __init__(self, example: dict, tools: EpisodeTools):
        self.tools = tools

    def step(self, turn: Turn) -> list[Message] | None:
        if not turn.calls:
            return None
        return [self.tools.call(call) for call in turn.calls]


BUILTINS: dict[str, Callable[[dict, EpisodeTools], Environment]] = {"tools": ToolEnv}


def get(name: str) -> Callable[[dict, EpisodeTools], Environment]:
    """The environment factory "tools", or a user "package.module:function" (a class works)."""
    return user_functions.resolve(name, BUILTINS, "environment")
