"""The RLVR recipe in the trainer (quickstart's tiny model, CPU): dynamic sampling trains only
informative groups and resumes exactly; the overlong shaping, entropy control and rollout
corrections run end to end with their metrics. References: the zero-std criterion is computed
here from the trained batch's metrics; the resumed run is compared with an uninterrupted one; a
correction whose weights are all 1 must leave the run unchanged."""

import os
import signal

import jax
import numpy as np
import pytest
from tests.fixtures.runs import (launch, max_diff, params_of, read_metrics, restore_like,
                                 state_leaves, tiny, wait_for)

from cfpo_jax import train

BINARY_REWARD = "tests.fixtures.rewards:first_is_digit"


def _dynamic(**overrides):
    return tiny(rl__dynamic_sampling=True, rl__dynamic_sampling_max_rounds=4,
                rewards__fns=(BINARY_REWARD,), **overrides)


@pytest.mark.slow  # three short runs: ~2 minutes on the shared 2-core box
def test_dynamic_sampling_trains_informative_groups_and_resumes_exactly(tmp_path):
    whole = train.run(_dynamic(train__num_steps=4, train__checkpoint_every=2),
                      str(tmp_path / "whole"), devices=jax.devices()[:1])
    steps = read_metrics(str(tmp_path / "whole"))
    assert max(m["dynamic_sampling_rounds"] for m in steps) > 1  # the case is not trivial
    for m in steps:
        assert m["dynamic_sampling_prompts"] == 4 * m["dynamic_sampling_rounds"]
        # a binary reward: the trained groups, all informative, average strictly inside (0, 1)
        if m["dynamic_sampling_filled_groups"] == 0:
            assert 0 < m["dynamic_sampling_trained_reward_mean"] < 1
        if m["dynamic_sampling_filled_groups"] == 0:
            assert m["zero_std_groups"] == 0
        else:  # the rounds ran out: the batch is filled up with uninformative groups
            assert m["dynamic_sampling_rounds"] == 4
            assert m["zero_std_groups"] == m["dynamic_sampling_filled_groups"]

    # Stopped after step 2's checkpoint (with the data iterator's position), then resumed.
    workdir = str(tmp_path / "resumed")
    train.run(_dynamic(train__num_steps=2, train__checkpoint_every=2), workdir,
              devices=jax.devices()[:1])
    resumed = train.run(_dynamic(train__num_steps=4, train__checkpoint_every=2), workdir,
                        devices=jax.devices()[:1])
    assert max_diff(params_of(resumed), params_of(whole)) <= 1e-6
    key = lambda m: (m["step"], m["dynamic_sampling_rounds"], m["reward_mean"])
    assert [key(m) for m in read_metrics(workdir)] == [key(m) for m in steps]


@pytest.mark.slow  # two trainer processes and a reference run: ~3 minutes on the 2-core box
def test_dynamic_sampling_killed_and_resumed_ends_where_the_uninterrupted_run_ends(tmp_path):
    """SIGKILL once the first checkpoint is complete, then the same command again: the data
    iterator's position (prompts consumed by the extra rounds included) comes back with the
    checkpoint, so the final state is the uninterrupted run's, bit for bit, and so is every step's
    number of rounds."""
    flags = ("--config.rl.dynamic_sampling=True", "--config.rl.dynamic_sampling_max_rounds=4")
    workdir = tmp_path / "preempted"
    ckpts = workdir / "checkpoints"
    first = launch(workdir, *flags, reward=BINARY_REWARD)
    wait_for(lambda: ckpts.is_dir() and any(d.isdigit() for d in os.listdir(ckpts)), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert killed_at < 6
    second = launch(workdir, *flags, reward=BINARY_REWARD)
    output = second.communicate(timeout=900)[0]
    assert second.returncode == 0, output
    assert f"resumed from step {killed_at}" in output

    reference_dir = str(tmp_path / "reference")
    reference = train.run(_dynamic(train__num_steps=6, train__checkpoint_every=2), reference_dir)
    rounds = [m["dynamic_sampling_rounds"] for m in read_metrics(reference_dir)]
    assert max(rounds) > 1  # more prompts than one round's were drawn: the case is not trivial
    resumed = restore_like(ckpts, 6, reference["state"])
    for a, b in zip(state_leaves(resumed), state_leaves(reference["state"])):
        np.testing.assert_array_equal(a, b)
    after = {m["step"]: m["dynamic_sampling_rounds"] for m in read_metrics(str(workdir))}
    assert [after[s] for s in sorted(after)] == rounds


@pytest.mark.slow  # four short runs
def test_recipe_options_run_end_to_end_and_a_neutral_correction_changes_nothing(tmp_path):
    """Off policy (μ = 2): Clip-Cov, the rollout corrections, the overlong filter and the soft
    punishment run, with their metrics. The sampler and the learner compute the same float32 logprobs here, so with a
    cap far above every weight, TIS multiplies each token by ~1: the run equals the plain one."""
    common = dict(rl__num_epochs=2, train__num_steps=2)
    plain = train.run(tiny(**common), str(tmp_path / "plain"), devices=jax.devices()[:1])
    tis = train.run(tiny(**common, rl__rollout_correction="tis", rl__rollout_correction_cap=1e6),
                    str(tmp_path / "tis"), devices=jax.devices()[:1])
    assert max_diff(params_of(tis), params_of(plain)) <= 1e-5
    for m in read_metrics(str(tmp_path / "tis")):
        assert abs(m["rollout_is_weight_mean"] - 1.0) < 1e-3 and m["rollout_corrected_frac"] == 0

    recipe = tiny(**common, rl__entropy_control="clip_cov", rl__clip_cov_ratio=0.1,
                  rl__clip_cov_lb=-1e3, rl__rollout_correction="mask",
                  rewards__overlong_buffer=1, rewards__overlong_penalty=0.5)
    train.run(recipe, str(tmp_path / "recipe"), devices=jax.devices()[:1])
    for m in read_metrics(str(tmp_path / "recipe")):
        assert 0 < m["entropy_control_frac"] <= 0.1 + 1e-6
        # the budget is 3 tokens: a response of 3 tokens gets the whole penalty
        assert -0.5 <= m["overlong_penalty_mean"] < 0 and 0 < m["overlong_penalised_frac"] <= 1
        assert m["rollout_is_weight_max"] >= 1.0 and m["rollout_corrected_frac"] == 0

    # The random policy never ends on EOS within 3 tokens: every response is truncated, so the
    # overlong filter leaves nothing in the loss and no gradient.
    train.run(tiny(**common, rl__overlong_filter=True), str(tmp_path / "filtered"),
              devices=jax.devices()[:1])
    for m in read_metrics(str(tmp_path / "filtered")):
        assert m["truncated_frac"] == 1.0 and m["grad_norm"] == 0.0
