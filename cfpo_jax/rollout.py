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

DAPO's reward shaping and dynamic sampling live here (issue 34). The soft overlong punishment
(`rewards.overlong_buffer`, `cfpo_jax.rewards.overlong`) is added to the reward functions' total
before advantages; `reward_mean` and the other reward metrics stay the functions' own, and the
penalty is logged as `overlong_penalty_mean` / `overlong_penalised_frac`. With
`rl.dynamic_sampling` a step samples rounds of prompts (`more_prompts`, the trainer's data
iterator) until `data.batch_size` groups whose rewards differ (`cfpo_jax.dynamic_sampling`: which
groups, the metrics, the fill when the rounds run out); informative means the reward functions'
total differs within the group — the penalty is not counted, as DAPO filters on accuracy. The
kept rows of the rounds are joined on device and prepared once, so the learner sees one batch of
the usual shape. The host metrics (`zero_std_groups` included) are those of the trained rows,
except the reward metrics (`reward_mean`, ...), which are over every row sampled — the policy's
reward, comparable with a run without dynamic sampling — with the trained rows' mean as
`dynamic_sampling_trained_reward_mean`.

One RL step's tensors stay on device: the host fetches the completion tokens (for the reward
text) and nothing else; the rewards go up once, in `learner.Learner.prepare`. The sampler gets a
key split off the state's rng each step: same seed and same data iterator state → same samples,
which is what makes a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfpo_jax import data, dynamic_sampling, envs, lora, metrics, rewards, sampling, sharding
from cfpo_jax.rewards import overlong
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

    def __call__(self, state, prompts: data.Batch, sample_key, more_prompts=None) -> Result:
        """One step's rollout of `prompts`. With `rl.dynamic_sampling`, `more_prompts()` gives
        the next `data.batch_size` prompts of each further round (the trainer's data iterator)."""
        rl = self.config.rl
        if not rl.dynamic_sampling:
            return self._result(state, *self._sample_and_score(state, prompts, sample_key), {})
        if more_prompts is None:
            raise ValueError("rl.dynamic_sampling samples more rounds of prompts: pass "
                             "more_prompts (e.g. the data iterator's next)")
        return self._dynamically_sampled(state, prompts, sample_key, more_prompts)

    def _dynamically_sampled(self, state, prompts: data.Batch, sample_key, more_prompts) -> Result:
        """Rounds of sampling until `data.batch_size` informative groups (see the module doc)."""
        rl = self.config.rl
        groups = dynamic_sampling.GroupFilter(len(prompts.prompts), rl.group_size,
                                              rl.dynamic_sampling_max_rounds)
        rounds, sampled = [], []
        while not groups.done:
            batch = prompts if groups.rounds == 0 else more_prompts()
            rows, meta = self._sample_and_score(
                state, batch, dynamic_sampling.round_key(sample_key, groups.rounds))
            rounds.append(meta)
            sampled.append((rows["reward_B"], rows["per_fn"]))
            # Which groups are informative is read off the reward functions' total, before the
            # overlong penalty (DAPO filters on accuracy).
            groups.add(rows, rows["reward_B"])
        rows, _ = groups.result(align=functools.partial(_same_prompt_width, pad_id=self.pad_id))
        meta = dict(  # the step's: failures and times summed, generator metrics averaged
            failures={k: sum(m["failures"][k] for m in rounds) for k in rounds[0]["failures"]},
            times={k: sum(m["times"][k] for m in rounds) for k in rounds[0]["times"]},
            generator_metrics={k: float(np.mean([m["generator_metrics"][k] for m in rounds]))
                               for k in rounds[0]["generator_metrics"]})
        # The reward metrics are the policy's, over every row sampled (comparable with a run
        # without dynamic sampling; the kept groups' mean leaves out the all-right and all-wrong
        # groups by construction); the trained rows' mean is logged apart.
        every = rewards.Scores(np.concatenate([r for r, _ in sampled]),
                               {k: np.concatenate([f[k] for _, f in sampled]) for k in sampled[0][1]},
                               meta["failures"])
        extra = dict(groups.metrics(), dynamic_sampling_trained_reward_mean=float(
            np.mean(rows["reward_B"])))
        result = self._result(state, rows, meta, extra)
        result.host_metrics.update(every.metrics("reward"))
        return result

    def _sample_and_score(self, state, prompts: data.Batch, sample_key) -> tuple[dict, dict]:
        """(rows, meta) of one round: rows are the device samples and, per row on the host, the
        reward functions' total and values, the overlong penalty and the prompt and completion
        lengths; meta the scorer's failures, the generator's metrics and the times."""
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
        rows = dict(
            samples=samples, reward_B=scores.total_B, per_fn=scores.per_fn,
            penalty_B=overlong.overlong_penalty(lengths_B, sampling_config.max_new_tokens,
                                                config.rewards.overlong_buffer,
                                                config.rewards.overlong_penalty),
            lengths_Bx2=np.stack([prompt_lengths, lengths_B], axis=1).astype(np.int32))
        return rows, dict(failures=scores.failures, generator_metrics=generator_metrics,
                          times=dict(time_sample_s=t1 - t0, time_score_s=t2 - t1))

    def _result(self, state, rows: dict, meta: dict, extra_metrics: dict) -> Result:
        """The learner's batch of scored rows (one round's, or the kept groups of several)."""
        rl = self.config.rl
        scores = rewards.Scores(rows["reward_B"], rows["per_fn"], meta["failures"])
        # DAPO's soft overlong punishment joins the reward here (0 with no buffer); the logged
        # reward is the reward functions' alone.
        reward_B = rows["reward_B"] + rows["penalty_B"]
        batch, device_metrics = self.learner.prepare(state, rows["samples"], reward_B,
                                                     rows["lengths_Bx2"])
        host_metrics = dict(
            **metrics.rollout_metrics(scores, rows["lengths_Bx2"][:, 1], rl.group_size,
                                      meta["times"]["time_sample_s"]),
            **meta["generator_metrics"], **extra_metrics)
        if self.config.rewards.overlong_buffer:
            host_metrics.update(overlong_penalty_mean=float(rows["penalty_B"].mean()),
                                overlong_penalised_frac=float(np.mean(rows["penalty_B"] < 0)))
        return Result(batch, rows["lengths_Bx2"], host_metrics, device_metrics, meta["times"])

    def close(self):
        self.scorer.close()
        self.generator.close()


def _same_prompt_width(rounds: list[dict], pad_id: int) -> list[dict]:
    """Rounds' rows with the samples' prompt columns left-padded to the widest round's (each
    round is bucketed to its own longest prompt), so that they join."""
    width = max(r["samples"].prompt_tokens.shape[1] for r in rounds)

    def pad(rows):
        samples = rows["samples"]
        pad_P = ((0, 0), (width - samples.prompt_tokens.shape[1], 0))
        return dict(rows, samples=samples.replace(
            prompt_tokens=jnp.pad(samples.prompt_tokens, pad_P, constant_values=pad_id),
            prompt_mask=jnp.pad(samples.prompt_mask, pad_P)))

    return [pad(r) for r in rounds]
