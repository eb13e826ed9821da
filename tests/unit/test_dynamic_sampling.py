"""Dynamic sampling's group filter: which rows it keeps, its metrics, and exact resumption with the
data iterator (rewards scripted here; the trainer-level kill-and-resume is in test_train)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.fixtures.tiny_tokenizer import tiny_tokenizer

from cfpo_jax import data
from cfpo_jax.dynamic_sampling import GroupFilter, informative_groups, round_key

G = 2  # group size


def _round(first_row, rewards):
    """A round's payload (row ids, as numpy and as a device array) and its rewards."""
    rows = np.arange(first_row, first_row + len(rewards))
    return dict(row=rows, tokens=jnp.asarray(np.stack([rows, -rows], 1))), np.array(rewards)


def test_informative_groups_are_those_with_unequal_rewards():
    reward = [1, 1, 0, 1, 0, 0, 0.5, 0.25]
    np.testing.assert_array_equal(informative_groups(reward, 2), [False, True, False, True])
    np.testing.assert_array_equal(informative_groups(reward, 4), [True, True])


def test_keeps_informative_groups_in_arrival_order_and_drops_the_surplus():
    f = GroupFilter(batch_size=3, group_size=G, max_rounds=5)
    f.add(*_round(0, [1, 1, 0, 1, 0, 0]))  # group 1 informative
    assert not f.done
    f.add(*_round(6, [0, 1, 1, 1, 1, 0]))  # groups 3, 5
    assert f.done
    payload, reward = f.result()
    np.testing.assert_array_equal(payload["row"], [2, 3, 6, 7, 10, 11])
    np.testing.assert_array_equal(np.asarray(payload["tokens"])[:, 1], -payload["row"])
    assert isinstance(payload["tokens"], jax.Array)
    np.testing.assert_array_equal(reward, [0, 1, 0, 1, 1, 0])
    assert f.metrics() == dict(dynamic_sampling_rounds=2, dynamic_sampling_kept_frac=3 / 6,
                               dynamic_sampling_informative_frac=3 / 6,
                               dynamic_sampling_prompts=6, dynamic_sampling_filled_groups=0)

    f = GroupFilter(batch_size=2, group_size=G, max_rounds=5)
    f.add(*_round(0, [0, 1, 1, 0, 0, 1]))  # 3 informative: the third is dropped
    payload, _ = f.result()
    np.testing.assert_array_equal(payload["row"], [0, 1, 2, 3])
    assert f.metrics()["dynamic_sampling_kept_frac"] == pytest.approx(2 / 3)
    assert f.metrics()["dynamic_sampling_informative_frac"] == 1.0


def test_out_of_rounds_it_fills_with_the_first_uninformative_groups():
    f = GroupFilter(batch_size=3, group_size=G, max_rounds=2)
    f.add(*_round(0, [1, 1, 0, 0, 0, 0]))
    f.add(*_round(6, [1, 1, 0, 1, 1, 1]))
    assert f.done
    payload, reward = f.result()
    np.testing.assert_array_equal(payload["row"], [8, 9, 0, 1, 2, 3])
    np.testing.assert_array_equal(reward, [0, 1, 1, 1, 0, 0])
    assert f.metrics() == dict(dynamic_sampling_rounds=2, dynamic_sampling_kept_frac=1 / 6,
                               dynamic_sampling_informative_frac=1 / 6,
                               dynamic_sampling_prompts=6, dynamic_sampling_filled_groups=2)


def test_align_joins_rounds_of_different_widths():
    f = GroupFilter(batch_size=2, group_size=G, max_rounds=3)
    f.add(dict(prompt=np.full((4, 2), 7)), [0, 1, 1, 1])  # group 0 kept, width 2
    f.add(dict(prompt=np.full((4, 4), 9)), [1, 1, 3, 2])  # group 1 kept, width 4

    def left_pad(payloads):
        width = max(p["prompt"].shape[1] for p in payloads)
        return [dict(prompt=np.pad(p["prompt"], ((0, 0), (width - p["prompt"].shape[1], 0))))
                for p in payloads]

    payload, _ = f.result(align=left_pad)
    np.testing.assert_array_equal(payload["prompt"], [[0, 0, 7, 7]] * 2 + [[9, 9, 9, 9]] * 2)


def test_misuse_is_named():
    with pytest.raises(ValueError, match="max_rounds must be >= 1; got 8, 2, 0"):
        GroupFilter(8, 2, 0)
    f = GroupFilter(batch_size=1, group_size=G, max_rounds=1)
    with pytest.raises(ValueError, match="3 rewards are not whole groups of 2"):
        f.add(dict(row=np.arange(3)), [0, 1, 0])
    with pytest.raises(RuntimeError, match="before it is done"):
        f.result()
    f.add(*_round(0, [0, 1]))
    with pytest.raises(RuntimeError, match="after it is done"):
        f.add(*_round(2, [0, 1]))


def test_round_zero_samples_with_the_step_key():
    key = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(jax.random.key_data(round_key(key, 0)),
                                  jax.random.key_data(key))
    keys = {tuple(np.asarray(jax.random.key_data(round_key(key, r))).tolist()) for r in range(4)}
    assert len(keys) == 4


# ----------------------------------------------------------------------------- resumption


def _reward(example, key, j):
    """A scripted, deterministic score of sample j of an example under a round key: half the
    groups come out all-equal."""
    salt = int(np.asarray(jax.random.key_data(key)).sum()) + sum(map(ord, example["question"]))
    return float(salt % 3 == 0 or (j == 0 and salt % 2 == 0))


def _steps(iterator, first_step, num_steps, batch_size=3, max_rounds=4):
    out = []
    for step in range(first_step, first_step + num_steps):
        step_key = jax.random.fold_in(jax.random.PRNGKey(0), step)
        f = GroupFilter(batch_size, G, max_rounds)
        while not f.done:
            batch = next(iterator)
            key = round_key(step_key, f.rounds)
            reward = [_reward(e, key, j) for e in batch.examples for j in range(G)]
            f.add(dict(question=np.repeat([e["question"] for e in batch.examples], G)), reward)
        payload, reward = f.result()
        out.append((list(payload["question"]), list(reward), f.metrics()))
    return out


def test_a_resumed_run_consumes_and_keeps_exactly_the_same_groups():
    def iterator():
        ds = data.load("synthetic:arithmetic", synthetic={"size": 20}, seed=1)
        return data.PromptIterator(ds, data.PromptBuilder(tiny_tokenizer(), "chat"), 3, seed=0)

    whole = _steps(iterator(), 0, 6)
    assert max(m["dynamic_sampling_rounds"] for _, _, m in whole) > 1  # the case is not trivial
    first = iterator()
    head = _steps(first, 0, 3)
    saved = dict(first.state)  # what the checkpoint of step 3 holds
    resumed = iterator()
    resumed.restore(saved)
    assert head + _steps(resumed, 3, 3) == whole
    consumed = sum(m["dynamic_sampling_prompts"] for _, _, m in whole)
    assert consumed == (resumed.state["epoch"] * 20 + resumed.state["position"])
