"""Multi-turn environments and tools (ARCHITECTURE.md, "envs/"): `environment` (the episode
API and the built-in tool environment), `tools` (built-in and user tools, bounded calls),
`formats` (the model's tool-call format), `rollout` (episodes sampled as one batch)."""

from cfpo_jax.envs.environment import EpisodeTools, ToolEnv, Turn
from cfpo_jax.envs.formats import FORMATS, Message, ToolCall
from cfpo_jax.envs.rollout import EnvRollout, prompt_tools
from cfpo_jax.envs.tools import ToolResult

__all__ = ["EnvRollout", "EpisodeTools", "FORMATS", "Message", "ToolCall", "ToolEnv", "ToolResult", "Turn",
           "prompt_tools"]
