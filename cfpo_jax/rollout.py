"""The rollout stage: one interface the trainer calls — sample → completion text → rewards →
the learner's rollout batch.

How completions are generated is chosen once, at build (`make_generator`): plain sampling
(`SingleTurn`, `cfpo_jax.sampling`) or multi-turn episodes with tools (`MultiTurn`,
`cfpo_jax.envs`). Both return (samples, metrics) for the same arguments, so `Rollout` never
asks which one it holds; another backend (an external inference engine) plugs in here.

Multi-turn episodes: each episode is one sequence (prompt, then every token after it) and the
batch's loss mask is `Samples.loss_mask` — the tokens the policy sampled — while the attention
covers the tool answers too, so they are context for every logprob but out of the loss, the
ratios, the KL and the metrics. The learner is unchanged.

One RL step's tensors stay on device: the host fetches the completion tokens (for the reward
text) and nothing else; the rewards go up once, in `learner.Learner.prepare`. The sampler gets a
key split off the state's rng each step: same seed and same data iterator state → same samples,
which is what makes a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from flax import nnx

from cfpo_jax import data, envs, lora, metrics, rewards, sampling, sharding
from cfpo_jax.batch import Batch


class SingleTurn:
    """One completion per (prompt, sample): `sampling.generate`."""

    def __init__(self, eos_ids):
        self.eos_ids = tuple(eos_ids)

    def generate(self, policy, prompts: data.Batch, **sample_kwargs):
        return sampling.generate(policy, prompts.prompts, eos_token_ids=self.eos_ids,
                                 **sample_kwargs), {}

    def close(self):
        pass


class MultiTurn:
    """One episode per (prompt, sample): the completion is the whole episode after the prompt
    (`envs.EnvRollout`)."""

    def __init__(self, env_config, tokenizer, eos_ids):
        self.episodes = envs.EnvRollout(env_config, tokenizer, eos_ids)

    def generate(self, policy, prompts: data.Batch, **sample_kwargs):
        return self.episodes.generate(policy, prompts.examples, prompts.prompts, **sample_kwargs)

    def close(self):
        self.episodes.close()


def make_generator(config, tokenizer, eos_ids):
    """`MultiTurn` when `config.env.name` is set, else `SingleTurn`."""
    if config.env.name:
        return MultiTurn(config.env, tokenizer, eos_ids)
    return SingleTurn(eos_ids)


@dataclasses.dataclass
class Result:
    """One rollout. batch: on device (see `batch.Batch`); lengths_Bx2: host int32, the prompt
    and completion tokens of each row (what the learner plans packed minibatches from);
    host_metrics: floats; device_metrics: scalars still on device (fetched once per step);
    times: time_sample_s, time_score_s."""

    batch: Batch
    lengths_Bx2: np.ndarray
    host_metrics: dict
    device_metrics: dict
    times: dict


class Rollout:
    """sample → completion text → rewards → advantages, old / reference logprobs."""

    def __init__(self, config, mesh, policy, learner, *, scorer=None, generator=None):
        """`policy`: a `policy.Policy` (graph, frozen state, tokenizer, ids); `learner`: the
        `learner.Learner` whose `prepare` makes the rollout batch."""
        self.config, self.mesh, self.learner = config, mesh, learner
        self.graphdef, self.frozen = policy.graphdef, policy.frozen
        self.tokenizer, self.pad_id = policy.tokenizer, policy.pad_id
        self.scorer = scorer or rewards.Scorer.from_config(config.rewards, mesh=mesh)
        self.generator = generator or make_generator(config, policy.tokenizer, policy.eos_ids)

    def sampling_policy(self, params):
        """The model the sampler runs for `params` (adapters merged in with
        `lora.merge_for_sampling`)."""
        policy = nnx.merge(self.graphdef, params, self.frozen)
        if self.config.lora.rank and self.config.lora.merge_for_sampling:
            policy = lora.merge(policy)
        return policy

    def __call__(self, state, prompts: data.Batch, sample_key) -> Result:
        config = self.config
        rl, sampling_config = config.rl, config.sampling
        t0 = time.time()
        samples, generator_metrics = self.generator.generate(
            self.sampling_policy(state["params"]), prompts,
            max_new_tokens=sampling_config.max_new_tokens, temperature=sampling_config.temperature,
            top_p=sampling_config.top_p, top_k=sampling_config.top_k, seed=sample_key,
            n=rl.group_size, pad_id=self.pad_id, mesh=self.mesh,
            **sampling.engine_settings(sampling_config))
        # The completion text is all the host needs from the samples.
        tokens_BxN, lengths_B = sharding.to_host((samples.tokens, samples.lengths))
        t1 = time.time()

        completions = self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(tokens_BxN, lengths_B)], skip_special_tokens=True)
        answers, fields = prompts.reward_inputs(rl.group_size)
        # The conversation each completion answers, for reward models to write in their own template.
        messages = [data.chat_messages(e["question"], config.data.system_prompt or None,
                                       config.data.user_template)
                    for e in prompts.examples for _ in range(rl.group_size)]
        scores = self.scorer(completions, answers, prompt_messages=messages, **fields)
        t2 = time.time()

        prompt_lengths = np.repeat([len(p) for p in prompts.prompts], rl.group_size)
        lengths_Bx2 = np.stack([prompt_lengths, lengths_B], axis=1).astype(np.int32)
        batch, device_metrics = self.learner.prepare(state, samples, scores.total_B, lengths_Bx2)
        host_metrics = dict(**metrics.rollout_metrics(scores, lengths_B, rl.group_size, t1 - t0),
                            **generator_metrics)
        return Result(batch, lengths_Bx2, host_metrics, device_metrics,
                      dict(time_sample_s=t1 - t0, time_score_s=t2 - t1))

    def close(self):
        self.scorer.close()
        self.generator.close()
