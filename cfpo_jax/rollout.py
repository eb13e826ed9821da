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

import base64
import dataclasses
import functools
import io
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cfpo_jax import (data, dynamic_sampling, envs, lora, metrics, rewards, sampling, sandbox,
                      sharding, weight_sync)
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


@dataclasses.dataclass
class Produced:
    """The sampler's half of a rollout (`Rollout.produce`): samples on device, the rewards
    (host [B], before any KL penalty), lengths_Bx2 (host), host metrics and times."""

    samples: sampling.Samples
    reward_B: np.ndarray
    lengths_Bx2: np.ndarray
    host_metrics: dict
    times: dict

    def to_json(self) -> dict:
        """Host copy for a checkpoint's JSON meta (the arrays as base64 .npy)."""
        arrays = {f.name: getattr(self.samples, f.name) for f in dataclasses.fields(self.samples)
                  if getattr(self.samples, f.name) is not None}
        arrays = dict(sharding.to_host(arrays), reward_B=self.reward_B, lengths_Bx2=self.lengths_Bx2)
        return dict(arrays={k: _encode(v) for k, v in arrays.items()},
                    host_metrics=self.host_metrics, times=self.times)

    @classmethod
    def from_json(cls, record: dict, mesh) -> "Produced":
        """`to_json`'s record back, the samples on `mesh` split over the batch axes."""
        arrays = {k: _decode(v) for k, v in record["arrays"].items()}
        reward_B, lengths_Bx2 = arrays.pop("reward_B"), arrays.pop("lengths_Bx2")
        batch_sh = sharding.batch_sharding(mesh)
        with jax.transfer_guard_host_to_device("allow"):
            samples = sampling.Samples(**{k: jax.make_array_from_callback(
                v.shape, batch_sh, lambda index, v=v: v[index], dtype=v.dtype)
                for k, v in arrays.items()})
        return cls(samples, reward_B, lengths_Bx2, record["host_metrics"], record["times"])


def _encode(x: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(x), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


class Rollout:
    """sample → completion text → rewards → advantages, old / reference logprobs; `produce` (the
    sampler's half) and `finish` (the learner's) apart for asynchronous rollouts (`Lagged`).

    Placement (`mesh.rollout_devices`, `policy.make_meshes`): the sampler runs on `mesh`, the
    rollout mesh, and `finish` on the learner's. Colocated (one mesh) the sampler reads the
    learner's parameters as they are. Disaggregated (disjoint meshes, each with its own sharding
    rules) the frozen state is placed on the rollout mesh once, the parameters before each
    rollout (`sync_weights`, device to device; `weight_sync_s` in the step's times), the sampler
    key goes with them, and the sampled batch goes back to the learner mesh device to device
    before `learner.prepare` — so the numbers are the colocated run's.

    Across processes (`weight_sync`'s union programs, which every process runs) two layouts
    (`sharding.placement`): both meshes span every process ('per_process': every process samples
    SPMD, as colocated), or the rollout mesh is one process of its own ('first'): only that
    process samples; it broadcasts the samples' shapes and the completion tokens (host, small),
    so every process scores the same text together (`rewards.Scorer` splits the items over the
    processes) and takes part in the batch's move to the learner mesh with stand-ins of the same
    shapes and no local shard (`sharding.without_local_shards`). Other splits are refused."""

    def __init__(self, config, mesh, policy, learner, *, scorer=None, generator=None):
        """`mesh`: the rollout mesh (the learner's own when colocated); `policy`: a
        `policy.Policy` (graph, frozen state, tokenizer, ids; placed on the learner mesh);
        `learner`: the `learner.Learner` whose `prepare` makes the rollout batch."""
        self.config, self.mesh, self.learner = config, mesh, learner
        self.graphdef, self.frozen = policy.graphdef, policy.frozen
        self.disaggregated = set(mesh.devices.flat) != set(learner.mesh.devices.flat)
        self._weights = None  # the learner -> rollout `WeightSync`, made at the first move
        self.weight_sync_s = 0.0
        samplers = {d.process_index for d in mesh.devices.flat}
        learners = {d.process_index for d in learner.mesh.devices.flat}
        everyone = set(range(jax.process_count()))
        # Whether this process samples, and whether the others need what it sampled.
        self.samples_here = jax.process_index() in samplers
        self.sampler_process = min(samplers)
        self.shares_samples = samplers != everyone
        if self.shares_samples and (len(samplers) > 1 or samplers & learners):
            raise ValueError(
                f"mesh.rollout_devices={config.mesh.rollout_devices} with mesh.rollout_placement="
                f"{config.mesh.rollout_placement!r} puts the rollout mesh on processes "
                f"{sorted(samplers)} and the learner mesh on {sorted(learners)} of "
                f"{len(everyone)}: across processes both must span every process "
                f"('per_process') or the rollout mesh must be one whole process ('first' with N "
                f"= the devices of one process)")
        if self.disaggregated:
            self.frozen = weight_sync.WeightSync(
                learner.mesh, mesh, sharding.param_shardings(mesh, policy.frozen))(policy.frozen)
            self._to_learner = weight_sync.WeightSync(mesh, learner.mesh,
                                                      sharding.batch_sharding(learner.mesh))
            # The sampler key as its data ([2] uint32): the union program moves arrays of rank >= 1.
            self._key_data = jax.jit(jax.random.key_data,
                                     out_shardings=NamedSharding(learner.mesh, P()))
            self._key_to_rollout = weight_sync.WeightSync(learner.mesh, mesh,
                                                          NamedSharding(mesh, P()))
        self.tokenizer, self.pad_id = policy.tokenizer, policy.pad_id
        sandbox.from_config(config)  # protections logged (strict: refused) now, not mid-rollout
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
        """One step's rollout of `prompts` from the policy in `state`. With
        `rl.dynamic_sampling`, `more_prompts()` gives the next `data.batch_size` prompts of each
        further round (the trainer's data iterator)."""
        if not self.disaggregated:
            return self.finish(state, self.produce(state["params"], prompts, sample_key,
                                                   more_prompts))
        params = self.sync_weights(state["params"])
        result = self.finish(state, self.produce(params, prompts, sample_key, more_prompts))
        return dataclasses.replace(result, times=dict(result.times,
                                                      weight_sync_s=self.weight_sync_s))

    def sync_weights(self, params):
        """The learner's `params` for the sampler: moved to the rollout mesh in its own shardings
        (disaggregated), or copied in place (colocated: the learner donates its own to the next
        update while an asynchronous rollout may still sample) — `weight_sync.WeightSync`. Its
        wall time goes to `weight_sync_s`."""
        if self._weights is None:
            shardings = (sharding.param_shardings(self.mesh, params) if self.disaggregated
                         else jax.tree.map(lambda x: x.sharding, params))
            self._weights = weight_sync.WeightSync(self.learner.mesh, self.mesh, shardings)
        params = self._weights(params)
        self.weight_sync_s = self._weights.seconds
        return params

    def produce(self, params, prompts: data.Batch, sample_key, more_prompts=None) -> Produced:
        """The sampler's half: sample from `params` (on the rollout mesh) → completion text →
        rewards (host), in rounds with `rl.dynamic_sampling`. `sample_key` may be on the learner
        mesh (its rng chain); it is placed on the rollout mesh here."""
        if self.disaggregated:
            sample_key = jax.random.wrap_key_data(
                self._key_to_rollout(self._key_data(sample_key)),
                impl=jax.random.key_impl(sample_key))
        # The rollout mesh in context (per thread: `Lagged` calls this from its producer).
        with jax.set_mesh(self.mesh):
            if not self.config.rl.dynamic_sampling:
                return self._produced(*self._sample_and_score(params, prompts, sample_key), {})
            if more_prompts is None:
                raise ValueError("rl.dynamic_sampling samples more rounds of prompts: pass "
                                 "more_prompts (e.g. the data iterator's next)")
            return self._dynamically_sampled(params, prompts, sample_key, more_prompts)

    def _dynamically_sampled(self, params, prompts: data.Batch, sample_key, more_prompts) -> Produced:
        """Rounds of sampling until `data.batch_size` informative groups (see the module doc)."""
        rl = self.config.rl
        groups = dynamic_sampling.GroupFilter(len(prompts.prompts), rl.group_size,
                                              rl.dynamic_sampling_max_rounds)
        rounds, sampled = [], []
        while not groups.done:
            batch = prompts if groups.rounds == 0 else more_prompts()
            rows, meta = self._sample_and_score(
                params, batch, dynamic_sampling.round_key(sample_key, groups.rounds))
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
        produced = self._produced(rows, meta, extra)
        produced.host_metrics.update(every.metrics("reward"))
        return produced

    def _sample_and_score(self, params, prompts: data.Batch, sample_key) -> tuple[dict, dict]:
        """(rows, meta) of one round: rows are the device samples and, per row on the host, the
        reward functions' total and values, the overlong penalty and the prompt and completion
        lengths; meta the scorer's failures, the generator's metrics and the times."""
        config = self.config
        rl, sampling_config = config.rl, config.sampling
        t0 = time.time()
        samples, generator_metrics = None, {}
        if self.samples_here:
            samples, generator_metrics = self.generator.generate(
                self.sampling_policy(params), prompts,
                max_new_tokens=sampling_config.max_new_tokens,
                temperature=sampling_config.temperature, top_p=sampling_config.top_p,
                top_k=sampling_config.top_k, seed=sample_key, n=rl.group_size, pad_id=self.pad_id,
                mesh=self.mesh, record_routing=config.model.moe_routing == "replay",
                **sampling.engine_settings(sampling_config))
        # The completion text is all the host needs from the samples.
        if self.shares_samples:
            samples, generator_metrics = self._shared(samples, generator_metrics)
            tokens_BxN, lengths_B = sharding.fetch((samples.tokens, samples.lengths))
        else:
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

    def _shared(self, samples, generator_metrics):
        """(samples, generator metrics) of the sampling process on every process: there its
        own; elsewhere stand-ins of the same shapes, dtypes and shardings with no local shard
        (for the programs that move them) and its metrics."""
        layout = None
        if samples is not None:
            arrays = {f.name: getattr(samples, f.name) for f in dataclasses.fields(samples)}
            layout = dict(metrics=generator_metrics, arrays={
                name: [list(x.shape), str(x.dtype), [list(a) if isinstance(a, tuple) else a
                                                     for a in x.sharding.spec]]
                for name, x in arrays.items() if x is not None})
        layout = sharding.broadcast_json(layout, self.sampler_process)
        if samples is not None:
            return samples, generator_metrics

        def stand_in(shape, dtype, spec):
            spec = P(*[tuple(a) if isinstance(a, list) else a for a in spec])
            return sharding.without_local_shards(shape, jnp.dtype(dtype),
                                                 NamedSharding(self.mesh, spec))
        return (sampling.Samples(**{name: stand_in(*entry)
                                    for name, entry in layout["arrays"].items()}),
                layout["metrics"])

    def _produced(self, rows: dict, meta: dict, extra_metrics: dict) -> Produced:
        """The scored rows (one round's, or the kept groups of several) with their host metrics;
        DAPO's soft overlong punishment joins the reward here (0 with no buffer), while the
        logged reward is the reward functions' alone."""
        rl = self.config.rl
        scores = rewards.Scores(rows["reward_B"], rows["per_fn"], meta["failures"])
        host_metrics = dict(
            **metrics.rollout_metrics(scores, rows["lengths_Bx2"][:, 1], rl.group_size,
                                      meta["times"]["time_sample_s"]),
            **meta["generator_metrics"], **extra_metrics)
        if self.config.rewards.overlong_buffer:
            host_metrics.update(overlong_penalty_mean=float(rows["penalty_B"].mean()),
                                overlong_penalised_frac=float(np.mean(rows["penalty_B"] < 0)))
        return Produced(rows["samples"], np.asarray(rows["reward_B"] + rows["penalty_B"]),
                        rows["lengths_Bx2"], host_metrics, meta["times"])

    def finish(self, state, produced: Produced) -> Result:
        """The learner's half: advantages, old / reference logprobs from `state` (on device)."""
        samples = produced.samples
        if self.disaggregated:  # back to the learner mesh, device to device
            samples = self._to_learner(samples)
        batch, device_metrics = self.learner.prepare(state, samples, produced.reward_B,
                                                     produced.lengths_Bx2)
        return Result(batch, produced.lengths_Bx2, produced.host_metrics, device_metrics,
                      produced.times)

    def close(self):
        self.scorer.close()
        self.generator.close()


def check_lag(meta: dict, max_staleness: int, step: int) -> None:
    """A checkpoint resumes only under the lag it was written with: its data position and queue
    belong to that lag."""
    saved = meta.get("max_staleness", 0)
    if saved != max_staleness:
        raise ValueError(f"the checkpoint at step {step} was written with rl.max_staleness={saved}; "
                         f"resume it with the same value (this run has {max_staleness})")


class Lagged:
    """Rollouts at a fixed lag k = `rl.max_staleness` >= 1 (`async_rollout.FixedLagProducer`):
    a producer thread runs `Rollout.produce` for step t with policy version max(t - k, 0) while
    the learner works on earlier steps; `get` finishes the rollout with the learner's state (old
    logprobs are the learner's policy at the start of the step: the proximal policy).

    The sampler key of step t is the one the synchronous loop uses (the state's rng chain,
    advanced here on the producer's side) and the prompts come from the data iterator in step
    order, so a rollout depends on (seed, step, version) only. After each update the learner's
    parameters are copied for the sampler (`Rollout.sync_weights`: onto the rollout mesh when
    disaggregated, else a copy, as the learner donates its own to the next update), timed as
    `weight_sync_s`: the sampler of step t samples from the synced copy of version t - k.

    Checkpoints: `meta(step)` is the data iterator's snapshot from before step step+k's prompts
    and the k queued rollouts (`Produced.to_json`); a `Lagged` built with that meta
    (`restored_meta`) continues exactly.

    Several processes: no thread (its programs and the learner's would be issued in different
    orders on different processes, and every process must issue the same collective programs in
    the same order). `publish` then generates, in line, every rollout its version allows — the
    same fixed-lag schedule, in one order everywhere. Sampling and learning then take turns (the
    step's metrics and the shared completions are sync points); overlapping them across
    processes needs the next update dispatched before the in-line rollout (issue 32, point 5).
    """

    def __init__(self, rollout: Rollout, iterator, learner, state, *, num_steps: int,
                 restored_meta: dict | None = None):
        from cfpo_jax import async_rollout

        config = rollout.config
        self.k = config.rl.max_staleness
        self.rollout, self.iterator, self.learner = rollout, iterator, learner
        start = int(sharding.fetch(state["step"]))
        self._rng_step, self._rng = start, state["rng"]
        self._keys = {}
        # The chain's first link now: `state["rng"]` is donated by the loop's `finish_step`.
        self._advance()
        restored = []
        if restored_meta is not None and start > 0:
            check_lag(restored_meta, self.k, start)
            restored = [async_rollout.Rollout(r["step"], r["version"],
                                              Produced.from_json(r["produced"], rollout.mesh),
                                              r["seconds"])
                        for r in restored_meta["rollout_queue"]]
        self.weight_sync_s = 0.0
        self._producer = async_rollout.FixedLagProducer(
            self._generate, max_staleness=self.k, start_step=start, num_steps=num_steps,
            snapshot=lambda: iterator.state, restored=restored,
            threaded=jax.process_count() == 1)
        self.publish(start, state)

    def _advance(self):
        """One link of the state's rng chain: the sampler key of `_rng_step`, then the next rng."""
        self._rng, self._keys[self._rng_step] = self.learner.split_rng(self._rng)
        self._rng_step += 1

    def _sample_key(self, step: int):
        while self._rng_step <= step:
            self._advance()
        return self._keys.pop(step)

    def _generate(self, step: int, version: int, params) -> Produced:
        return self.rollout.produce(params, next(self.iterator), self._sample_key(step),
                                    more_prompts=lambda: next(self.iterator))

    def publish(self, version: int, state) -> None:
        """The learner's policy after `version` RL steps (its parameters copied for the sampler)."""
        params = self.rollout.sync_weights(state["params"])
        self.weight_sync_s = self.rollout.weight_sync_s
        self._producer.publish(version, params)

    def get(self, state, step: int) -> Result:
        """The rollout of RL step `step`, finished with `state`; its host metrics carry
        staleness_mean / staleness_max (RL steps between this policy and the sampler's) and its
        times time_wait_s (the learner waiting for the producer) and weight_sync_s."""
        from cfpo_jax import async_rollout

        t0 = time.time()
        produced = self._producer.get(step)
        waited = time.time() - t0
        result = self.rollout.finish(state, produced.value)
        # Every sequence of a fixed-lag rollout comes from the same version.
        rows = len(produced.value.lengths_Bx2)
        staleness = async_rollout.staleness_metrics(step, [produced.version] * rows)
        return dataclasses.replace(
            result, host_metrics=dict(result.host_metrics, **staleness),
            times=dict(result.times, time_wait_s=waited, weight_sync_s=self.weight_sync_s))

    def meta(self, step: int) -> dict:
        """What a checkpoint after `step` RL steps needs to resume exactly (JSON)."""
        pending, snapshot = self._producer.pending(step)
        queue = None
        if self.rollout.samples_here or not self.rollout.shares_samples:
            queue = [dict(step=r.step, version=r.version, seconds=r.seconds,
                          produced=r.value.to_json()) for r in pending]
        if self.rollout.shares_samples:  # the sampling process holds the queued samples
            queue = sharding.broadcast_json(queue, self.rollout.sampler_process)
        return dict(data=snapshot, max_staleness=self.k, rollout_queue=queue)

    def close(self):
        self._producer.close()


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
