"""Multi-turn rollouts: episodes of model turns and environment answers, sampled as one batch.

`EnvRollout` (one per run, from `config.env`) holds the environment factory, the tools, the
tool-call format and the limits. `generate` makes one environment per row (row r = sample
r % n of example r // n) and runs `sampling.generate` with a `turn_end` that, for the row whose
turn ended: decodes the turn (the tokens since the last answer), parses its tool calls
(`formats.parse_calls`), lets the environment answer, and returns the answer's tokens in the
model's format (`formats.observation_text`) — in the sampler's thread pool, all waiting rows at
once, while the other rows decode.

Limits: `max_turns` model turns per episode (the episode ends after the last, whatever it
asked for); a token budget per episode, `sampling.max_new_tokens`, shared by the model's tokens
and the answers' (an answer that does not fit is cut and the episode ends there, as truncated);
`tool_timeout_s` per tool call and `max_observation_chars` per result (`tools.call`).

Token bookkeeping: an episode is one sequence, prompt then its N columns; the answers' tokens
(tool results, template tokens) are in `Samples.mask` (context) but not in `Samples.generated`
(the loss mask), so the trainer computes logprobs with them as context and trains, clips and
compares only the model's own tokens. The answers are tokenised on their own: the sequence the
trainer sees is exactly the one sampled, never a re-tokenisation of the episode's text.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading

import numpy as np

from cfpo_jax import sampling
from cfpo_jax.envs import environment, formats
from cfpo_jax.envs import tools as tools_lib
from cfpo_jax.sharding import to_host


def prompt_tools(env_config) -> tuple[dict, ...]:
    """The tool schemas a prompt's chat template lists: the chat formats' ("hermes", "llama3");
    none for single-turn runs and for "tag" (its prompt explains the tag itself)."""
    if not env_config.name or env_config.format == "tag":
        return ()
    return tuple(tools_lib.get(name).schema() for name in env_config.tools)


@dataclasses.dataclass
class _Episode:
    env: object
    tools: environment.EpisodeTools
    turns: int = 0  # turns answered by turn_end
    reported: int = 0  # columns turn_end has seen (incl. the answers it returned)
    observation_tokens: int = 0


class EnvRollout:
    """Multi-turn sampling for a run (see the module doc)."""

    def __init__(self, env_config, tokenizer, eos_ids):
        self.format = env_config.format
        if self.format not in formats.FORMATS:
            raise ValueError(f"env.format={self.format!r}; valid: {list(formats.FORMATS)}")
        self.factory = environment.get(env_config.name)
        self.tools = [tools_lib.get(name) for name in env_config.tools]
        self.max_turns = env_config.max_turns
        self.timeout_s, self.max_chars = env_config.tool_timeout_s, env_config.max_observation_chars
        self.tokenizer = tokenizer
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.eos_texts = tuple(tokenizer.decode([i]) for i in self.eos_ids)
        self.stop_sequences = formats.stop_token_sequences(tokenizer, formats.stop_strings(self.format))
        self._tokenizer_lock = threading.Lock()  # one tokenizer, many turn_end threads
        self._executor = concurrent.futures.ThreadPoolExecutor(env_config.num_threads,
                                                               thread_name_prefix="env")

    @classmethod
    def from_config(cls, config, tokenizer, eos_ids) -> "EnvRollout | None":
        """From `config.env`; None when `env.name` is empty (single-turn sampling)."""
        return cls(config.env, tokenizer, eos_ids) if config.env.name else None

    def close(self):
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _turn_end(self, episode: _Episode, tokens: list[int]) -> list[int] | None:
        turn_tokens = tokens[episode.reported:]
        episode.turns += 1
        episode.reported = len(tokens)
        if episode.turns >= self.max_turns:
            return None
        with self._tokenizer_lock:
            text = self.tokenizer.decode(turn_tokens, skip_special_tokens=False)
        turn = environment.Turn(episode.turns, text, tuple(formats.parse_calls(self.format, text)))
        messages = episode.env.step(turn)
        if not messages:
            return None
        observation = formats.observation_text(self.format, self.tokenizer, list(messages),
                                               ended_with_eos=turn_tokens[-1] in self.eos_ids,
                                               eos_texts=self.eos_texts)
        with self._tokenizer_lock:
            ids = self.tokenizer(observation, add_special_tokens=False)["input_ids"]
        episode.reported += len(ids)
        episode.observation_tokens += len(ids)
        return ids

    def generate(self, policy, examples: list[dict], prompts, *, n: int, **generate_kwargs):
        """Episodes for `examples` (their prompt token lists `prompts`), `n` per example.

        generate_kwargs: `sampling.generate`'s (max_new_tokens: the episode's token budget).
        Returns (Samples with `generated`, host metrics: per-episode means of turns, tool calls,
        tool errors, tool time-outs and answer tokens, and the fraction of episodes that hit
        max_turns).
        """
        episodes = []
        for example in examples:
            for _ in range(n):
                tools = environment.EpisodeTools(self.tools, timeout_s=self.timeout_s, max_chars=self.max_chars)
                episodes.append(_Episode(self.factory(example, tools), tools))
        samples = sampling.generate(
            policy, prompts, n=n, eos_token_ids=self.eos_ids, stop_sequences=self.stop_sequences,
            turn_end=lambda row, tokens: self._turn_end(episodes[row], tokens),
            executor=self._executor, **generate_kwargs)
        lengths = np.asarray(to_host(samples.lengths))
        # A last turn cut by the budget never reached turn_end; it is a turn all the same.
        turns = np.array([e.turns + (length > e.reported) for e, length in zip(episodes, lengths)])
        metrics = dict(
            turns_mean=float(turns.mean()),
            max_turns_frac=float(np.mean(turns >= self.max_turns)),
            tool_calls_mean=float(np.mean([e.tools.calls for e in episodes])),
            tool_errors_mean=float(np.mean([e.tools.errors for e in episodes])),
            tool_timeouts_mean=float(np.mean([e.tools.timeouts for e in episodes])),
            observation_tokens_mean=float(np.mean([e.observation_tokens for e in episodes])),
        )
        return samples, metrics
