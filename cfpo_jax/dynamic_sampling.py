"""DAPO's dynamic sampling: only groups with a learning signal reach the learner.

A group (the `group_size` responses to one prompt) whose rewards are all equal has zero
advantage under every group-relative estimator, so it contributes no policy gradient and only
dilutes the batch. With `rl.dynamic_sampling` the rollout samples rounds of `data.batch_size`
prompts, keeps the informative groups (rewards not all equal) in arrival order, and stops as
soon as it has `data.batch_size` of them (the surplus of the last round is dropped, as verl's
DAPO trainer does) or after `rl.dynamic_sampling_max_rounds` rounds. If the rounds run out
first, it trains on what it has: the missing groups are filled with the first uninformative
groups sampled (zero advantage: no policy gradient, as they would have had without dynamic
sampling), so every step has the same batch shape and nothing recompiles; the metrics say so.

Determinism (what makes a resumed run equal an uninterrupted one): round r samples with
`round_key(sample_key, r)` — round 0 with the step's key itself, so a step that needs one round
is the step without dynamic sampling — and each round takes the data iterator's next batch, so
the iterator's position after the step (what the checkpoint saves) covers every prompt consumed.

The rewards it filters on are the caller's choice; the trainer (`cfpo_jax.rollout`) gives it the
reward functions' total, before DAPO's overlong penalty (DAPO filters on accuracy).

`GroupFilter` does the bookkeeping on host rewards and takes the kept rows out of each round's
payload (any pytree of numpy or jax arrays with rows first, group by group: the samples, the
prompt lengths, ...) at once, so only kept rows stay alive between rounds. The payloads of
different rounds are joined after `result`'s `align` (e.g. prompt columns padded to one width).

Metrics: `dynamic_sampling_rounds`, `dynamic_sampling_kept_frac` (informative groups kept over
groups sampled; the last round's surplus is sampled but not kept),
`dynamic_sampling_informative_frac` (informative groups over groups sampled: the share of the
sampling that had a learning signal), `dynamic_sampling_prompts` (prompts consumed),
`dynamic_sampling_filled_groups` (uninformative groups trained on because the rounds ran out; 0
when the batch is full).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def informative_groups(reward_B, group_size: int) -> np.ndarray:
    """bool [B / group_size]: the groups whose rewards are not all equal."""
    reward_NxG = np.asarray(reward_B, np.float64).reshape(-1, group_size)
    return np.ptp(reward_NxG, axis=1) > 0


def round_key(sample_key, round_index: int):
    """The sampler key of round `round_index` of a step whose key is `sample_key`."""
    return sample_key if round_index == 0 else jax.random.fold_in(sample_key, round_index)


def _take_rows(tree, rows):
    return jax.tree.map(lambda x: x[rows], tree)


def _concat(trees):
    def cat(*xs):
        return jnp.concatenate(xs) if isinstance(xs[0], jax.Array) else np.concatenate(xs)

    return jax.tree.map(cat, *trees)


class GroupFilter:
    """Accumulates one step's informative groups over sampling rounds.

    filter = GroupFilter(batch_size, group_size, max_rounds)
    while not filter.done:
        payload, reward_B = <sample and score the next data.batch_size prompts>
        filter.add(payload, reward_B)
    payload, reward_B = filter.result()   # batch_size × group_size rows
    """

    def __init__(self, batch_size: int, group_size: int, max_rounds: int):
        if batch_size < 1 or group_size < 1 or max_rounds < 1:
            raise ValueError(f"batch_size, group_size and max_rounds must be >= 1; got "
                             f"{batch_size}, {group_size}, {max_rounds}")
        self.batch_size, self.group_size, self.max_rounds = batch_size, group_size, max_rounds
        self.rounds = self.groups_seen = self.informative_seen = 0
        self._kept, self._kept_groups = [], 0  # (payload, reward) of informative groups
        self._spare, self._spare_groups = [], 0  # uninformative groups, for a short batch

    @property
    def done(self) -> bool:
        return self._kept_groups >= self.batch_size or self.rounds >= self.max_rounds

    def add(self, payload, reward_B) -> None:
        """One round: `payload` (rows group by group) and its rewards [rows]."""
        if self.done:
            raise RuntimeError("GroupFilter.add after it is done")
        reward_B = np.asarray(reward_B, np.float32)
        if reward_B.shape[0] % self.group_size:
            raise ValueError(f"{reward_B.shape[0]} rewards are not whole groups of "
                             f"{self.group_size}")
        useful_N = informative_groups(reward_B, self.group_size)
        self.rounds += 1
        self.groups_seen += useful_N.size
        self.informative_seen += int(useful_N.sum())
        for store, groups, need in ((self._kept, np.flatnonzero(useful_N),
                                     self.batch_size - self._kept_groups),
                                    (self._spare, np.flatnonzero(~useful_N),
                                     self.batch_size - self._spare_groups)):
            groups = groups[:max(need, 0)]
            if groups.size == 0:
                continue
            rows = (groups[:, None] * self.group_size + np.arange(self.group_size)).reshape(-1)
            store.append((_take_rows(payload, rows), reward_B[rows]))
            if store is self._kept:
                self._kept_groups += groups.size
            else:
                self._spare_groups += groups.size

    @property
    def filled_groups(self) -> int:
        return max(self.batch_size - self._kept_groups, 0)

    def result(self, align=None):
        """(payload, reward [batch_size × group_size]): the kept groups in arrival order, then
        as many uninformative ones as the batch lacks. `align` (list of payloads → list of
        payloads) makes the rounds' trailing shapes equal before they are joined, e.g. left-pads
        each round's prompt columns to the widest round's."""
        if not self.done:
            raise RuntimeError(f"GroupFilter.result before it is done ({self._kept_groups} of "
                               f"{self.batch_size} groups after {self.rounds} rounds)")
        parts = list(self._kept)
        fill = self.filled_groups * self.group_size
        for payload, reward in self._spare:
            if fill <= 0:
                break
            take = np.arange(min(fill, reward.shape[0]))
            parts.append((_take_rows(payload, take), reward[take]))
            fill -= take.size
        payloads, rewards = zip(*parts)
        payloads = list(payloads) if align is None else align(list(payloads))
        return _concat(payloads), np.concatenate(rewards)

    def metrics(self) -> dict[str, float]:
        return dict(
            dynamic_sampling_rounds=self.rounds,
            dynamic_sampling_kept_frac=min(self._kept_groups, self.batch_size)
            / max(self.groups_seen, 1),
            dynamic_sampling_informative_frac=self.informative_seen / max(self.groups_seen, 1),
            dynamic_sampling_prompts=self.groups_seen,
            dynamic_sampling_filled_groups=self.filled_groups,
        )
