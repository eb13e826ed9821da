"""Asynchronous RL in the trainer (`rl.max_staleness`, `rollout.Lagged`): the producer path at
k = 0 equals the synchronous loop metric for metric; at k = 2 the rollouts come from the policy two
steps older (staleness metrics); a producer or scorer failure surfaces with its traceback; SIGKILL
or SIGTERM and resume at k = 2 ends where the uninterrupted run ends. References: the synchronous
loop (the code path that existed before this feature) and an uninterrupted run."""

import os
import signal

import jax
import numpy as np
import pytest

from cfpo_jax import async_rollout, checkpoint, metrics, train
from cfpo_jax import rollout as rollout_lib
from tests.fixtures.runs import (launch, params_of, quickstart, quickstart_study, read_metrics,
                                 restore_like, state_leaves, tiny, wait_for)

# What differs between two identical runs: wall times and what is derived from them.
TIMING = ("time_", "tokens_per_s", "weight_sync_s", "eta")


def _compared(history):
    """Metrics that must agree: all but times and the staleness (the synchronous loop has none)."""
    return [{k: v for k, v in h.items() if not k.startswith(TIMING + ("staleness",))}
            for h in history]


def run_through_producer(config, workdir):
    """The trainer's loop written out with `rollout.Lagged` at the config's lag (k = 0 too):
    every rollout through the producer thread, finished with the learner's state."""
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=1000, keep=1)
    parts, state = train.build(config, workdir, devices=jax.devices()[:1], ckpt=ckpt,
                               progress=metrics.Progress(1, enabled=False))
    history = []
    with jax.set_mesh(parts.mesh):
        lagged = rollout_lib.Lagged(parts.rollout, parts.iterator, parts.learner, state,
                                    num_steps=config.train.num_steps)
        try:
            for step in range(config.train.num_steps):
                next_rng, _ = parts.learner.split_rng(state["rng"])
                rollout = lagged.get(state, step)
                state, update_metrics = parts.learner.learn(state, rollout.batch,
                                                            rollout.lengths_Bx2, step)
                state = parts.learner.finish_step(state, next_rng)
                lagged.publish(step + 1, state)
                record = metrics.step_metrics(rollout.host_metrics, rollout.device_metrics,
                                              update_metrics, state)
                record.update(parts.learner.packing_metrics())
                history.append(dict(step=step + 1, **record))
        finally:
            lagged.close()
            parts.rollout.close()
            ckpt.close()
    return state, history


@pytest.mark.slow  # two trainer builds: ~1 min on 2 idle cores, more on a shared box
def test_producer_at_lag_0_equals_the_synchronous_loop(tmp_path):
    """4 tiny steps (the slow variant runs 20 quickstart steps): every metric and the final
    parameters of the producer path at k = 0 equal the synchronous loop's, bit for bit."""
    config = tiny(train__num_steps=4, rl__num_epochs=2)
    sync = train.run(config, str(tmp_path / "sync"), devices=jax.devices()[:1])
    state, history = run_through_producer(config, str(tmp_path / "producer"))
    assert _compared(history) == _compared(sync["history"])
    assert all(h["staleness_max"] == 0 for h in history)
    for a, b in zip(params_of(sync), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # two 20-step quickstart runs
def test_producer_at_lag_0_equals_the_synchronous_loop_on_20_quickstart_steps(tmp_path):
    config = quickstart(train__num_steps=20, warmstart__steps=0, eval__sources=(),
                        train__tensorboard=False, train__checkpoint_every=1000)
    sync = train.run(config, str(tmp_path / "sync"), devices=jax.devices()[:1])
    _, history = run_through_producer(config, str(tmp_path / "producer"))
    assert _compared(history) == _compared(sync["history"])


@pytest.mark.slow  # two trainer runs: ~2 min on the shared box
def test_lag_2_samples_from_the_policy_two_steps_older(tmp_path):
    """k = 2: step 1's rollout is the synchronous one (version 0 for both), later ones are not;
    staleness_mean per step = min(t, 2)."""
    config = tiny(train__num_steps=4, rl__max_staleness=2)
    lagged = train.run(config, str(tmp_path / "k2"), devices=jax.devices()[:1])["history"]
    assert [h["staleness_mean"] for h in lagged] == [0.0, 1.0, 2.0, 2.0]
    assert [h["staleness_max"] for h in lagged] == [0.0, 1.0, 2.0, 2.0]
    assert all(h["weight_sync_s"] > 0 and "time_wait_s" in h for h in lagged)
    sync = train.run(tiny(train__num_steps=4), str(tmp_path / "k0"), devices=jax.devices()[:1])
    sync = sync["history"]
    assert lagged[0]["loss"] == sync[0]["loss"]
    # Steps 2 and 3 use version 0 at k = 2 (version 1, 2 synchronously): other samples.
    assert any(lagged[i]["loss"] != sync[i]["loss"] for i in (1, 2, 3))


def failing_produce(self, params, prompts, sample_key, more_prompts=None):
    raise ConnectionError("reward worker lost")


def test_a_producer_failure_surfaces_with_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(rollout_lib.Rollout, "produce", failing_produce)
    with pytest.raises(async_rollout.ProducerError) as info:
        train.run(tiny(rl__max_staleness=1), str(tmp_path), devices=jax.devices()[:1])
    assert "failing_produce" in str(info.value) and "ConnectionError: reward worker lost" in str(info.value)


def failing_scorer(self, completions, answers, **fields):
    raise BrokenPipeError("reward worker pool lost")


def test_a_reward_failure_in_the_producer_surfaces_with_its_traceback(tmp_path, monkeypatch):
    """The scorer itself failing (not one reward function on one item, which scores 0 and is
    counted) inside the producer thread at k = 1: the trainer raises with the traceback through
    the rollout's scoring, and returns (no hang)."""
    from cfpo_jax import rewards

    monkeypatch.setattr(rewards.Scorer, "__call__", failing_scorer)
    with pytest.raises(async_rollout.ProducerError) as info:
        train.run(tiny(rl__max_staleness=1), str(tmp_path), devices=jax.devices()[:1])
    message = str(info.value)
    assert "failed at step 0" in message
    assert "_sample_and_score" in message and "failing_scorer" in message
    assert "BrokenPipeError: reward worker pool lost" in message


def test_bad_values_are_refused():
    from cfpo_jax import config as config_lib

    for overrides, message in [(dict(rl__max_staleness=-1), "rl.max_staleness must be"),
                               (dict(mesh__rollout_devices=-2), "mesh.rollout_devices=-2")]:
        with pytest.raises(ValueError, match=message):
            config_lib.validate(tiny(**overrides))
    # Several processes run the same schedule without a thread (test_placement_processes.py).
    config_lib.validate(tiny(rl__max_staleness=1, mesh__distributed=True))


@pytest.mark.slow  # three trainer processes
def test_sigkill_and_resume_at_lag_2_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL after the first checkpoint, resume to the end: the queued rollouts come back from
    the checkpoint, so the final state is the uninterrupted run's."""
    workdir = tmp_path / "preempted"
    ckpts = workdir / "checkpoints"
    first = launch(workdir, "--config.rl.max_staleness=2")
    wait_for(lambda: ckpts.is_dir() and any(d.isdigit() for d in os.listdir(ckpts)), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert killed_at < 6
    second = launch(workdir, "--config.rl.max_staleness=2")
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    assert f"resumed from step {killed_at}" in output

    reference = train.run(tiny(train__num_steps=6, train__checkpoint_every=2, rl__max_staleness=2),
                          str(tmp_path / "ref"))
    resumed = restore_like(ckpts, 6, reference["state"])
    # Every leaf (the typed rng key by its data) bit for bit.
    for a, b in zip(state_leaves(resumed), state_leaves(reference["state"])):
        np.testing.assert_array_equal(a, b)
    steps = read_metrics(str(workdir))
    assert [h["staleness_mean"] for h in steps if h["step"] > killed_at][-1] == 2.0


@pytest.mark.slow  # three trainer runs
def test_sigterm_at_lag_2_saves_the_queue_exits_0_and_resumes_to_the_same_state(tmp_path):
    """SIGTERM after the first checkpoint: the step in progress finishes, the state and the queued
    rollouts are saved, exit 0; the resumed run ends where the uninterrupted run ends."""
    workdir = tmp_path / "stopped"
    ckpts = workdir / "checkpoints"
    lag = ("--config.rl.max_staleness=2", "--config.train.num_steps=8")
    first = launch(workdir, *lag)
    wait_for(lambda: ckpts.is_dir() and any(d.isdigit() for d in os.listdir(ckpts)), first)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output
    stopped_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert f"SIGTERM: saved step {stopped_at} and stopped" in output
    assert stopped_at < 8
    second = launch(workdir, *lag)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    assert f"resumed from step {stopped_at}" in output

    reference = train.run(tiny(train__num_steps=8, train__checkpoint_every=2, rl__max_staleness=2),
                          str(tmp_path / "ref"))
    resumed = restore_like(ckpts, 8, reference["state"])
    for a, b in zip(state_leaves(resumed), state_leaves(reference["state"])):
        np.testing.assert_array_equal(a, b)
    # Every step once, and the metrics of the steps after the stop are the reference's.
    steps = read_metrics(str(workdir))
    assert [h["step"] for h in steps] == list(range(1, 9))
    for got, want in zip(steps[stopped_at:], reference["history"][stopped_at:]):
        assert (got["loss"], got["reward_mean"]) == (want["loss"], want["reward_mean"])


def test_the_staleness_study_expands_to_valid_configs():
    """configs/studies/staleness_quickstart.py: 5 lags × 2 objectives × 2 ratio references
    (recomputed with TIS, behaviour without) × 5 seeds, each a valid training config at the frontier
    cell (lr 1e-3, μ = 4)."""
    from cfpo_jax import config as config_lib
    study = quickstart_study("staleness_quickstart")
    runs = study.runs()
    assert len(runs) == 100
    configs = [study.config(r) for r in runs]
    for config in configs:
        config_lib.validate(config)
        assert (config.optim.lr, config.rl.num_epochs, config.train.num_steps) == (1e-3, 4, 100)
    assert sorted({(c.rl.max_staleness, c.rl.objective, c.rl.ratio_reference,
                    c.rl.rollout_correction) for c in configs}) == sorted(
        (k, o, ref, corr) for k in (0, 1, 2, 4, 8) for o in ("cfpo", "ppo")
        for ref, corr in (("recomputed", "tis"), ("behaviour", "none")))


def test_the_grad_clip_study_is_the_composition_studys_plain_cell_with_clipping_off():
    """configs/studies/grad_clip_frontier_quickstart.py is read beside the composition study's
    cell without either trick: the same configs, seed for seed, but optim.max_grad_norm = 0."""
    study = quickstart_study
    composition = {(r.value("rl.objective"), r.seed): study("composition_quickstart").config(r)
                   for r in study("composition_quickstart").runs()
                   if not r.value("rl.dynamic_sampling") and r.value("rl.entropy_control") == "none"}
    clip_off = study("grad_clip_frontier_quickstart")
    assert len(clip_off.runs()) == len(composition) == 10
    for run in clip_off.runs():
        config = clip_off.config(run).to_dict()
        reference = composition[(run.value("rl.objective"), run.seed)].to_dict()
        assert config["optim"].pop("max_grad_norm") == 0.0
        assert reference["optim"].pop("max_grad_norm") == 1.0
        for knob in ("dynamic_sampling_max_rounds", "clip_cov_ratio"):  # inert with the tricks off
            reference["rl"][knob] = config["rl"][knob]
        assert config == reference, run.name
