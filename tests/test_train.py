"""The training loop end to end on the quickstart's tiny model (CPU, 8 fake devices).

Runs are in-process where possible (`train.run`); the preemption tests need real processes, so they
run `python -m cfpo_jax.train` and signal it. References are independent of the code under test:
the reward criterion is computed here from metrics.jsonl, CFPO/GRPO equality follows from their
gradients agreeing at r = 1 (losses docstring), and the resume test compares against an
uninterrupted run.
"""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cfpo_jax import batch as batch_lib
from cfpo_jax import checkpoint, learner, packing, train
from cfpo_jax import policy as policy_lib
from cfpo_jax import state as state_lib
from cfpo_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
DENSE_REWARD = "tests._rewards:digit_fraction"


def quickstart(**overrides):
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for dotted, value in overrides.items():
        *sections, key = dotted.split("__")
        node = config
        for section in sections:
            node = node[section]
        node[key] = value
    return config


def tiny(**overrides):
    """A few-second run: small batches, no warm start, no TensorBoard, a dense reward."""
    base = dict(data__batch_size=4, rl__group_size=4, sampling__max_new_tokens=3,
                rewards__fns=(DENSE_REWARD,), optim__schedule="constant", eval__sources=(),
                warmstart__steps=0, train__num_steps=2, train__tensorboard=False,
                train__checkpoint_every=100)
    return quickstart(**{**base, **overrides})


def params_of(result):
    return jax.tree.leaves(jax.device_get(result["state"]["params"]))


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def read_metrics(workdir, kind="train"):
    """metrics.jsonl records of RL steps (kind="train") or of evaluations (kind="eval")."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    is_eval = lambda record: any(key.startswith("eval/") for key in record)
    return [r for r in records if is_eval(r) == (kind == "eval")]


# ---------------------------------------------------------------- learning


def test_shortened_quickstart_reward_rises(tmp_path):
    config = quickstart(train__num_steps=150, train__checkpoint_every=1000)
    result = train.run(config, str(tmp_path), devices=jax.devices()[:1])
    rewards = [m["reward_mean"] for m in read_metrics(str(tmp_path))]
    assert len(rewards) == 150
    tenth = len(rewards) // 10
    first, last = np.mean(rewards[:tenth]), np.mean(rewards[-tenth:])
    # Measured 2026-11-23: 0.33 → 0.60 over the first and last 15 steps.
    assert last - first >= 0.2, (first, last, rewards)
    assert result["state"]["skipped_updates"] == 0
    expected = {"step", "reward_mean", "reward/gsm8k_mean", "clip_frac", "ratio_dev", "ppo_kl",
                "entropy", "response_len_mean", "truncated_frac", "zero_std_groups", "grad_norm",
                "lr", "sampler_logprob_gap", "tokens_per_s", "time_sample_s", "time_learn_s",
                "skipped_updates"}
    assert expected <= set(read_metrics(str(tmp_path))[0])
    # The sampler and the trainer agree on the logprobs of what was sampled.
    assert max(m["sampler_logprob_gap"] for m in read_metrics(str(tmp_path))) < 1e-4
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    # The final evaluation is in the same file, at the last step.
    (final_eval,) = read_metrics(str(tmp_path), kind="eval")
    # Greedy accuracy on 200 held-out problems (measured 0.895).
    assert final_eval["step"] == 150 and final_eval["eval/arithmetic/greedy"] >= 0.8


def test_eval_at_start_evaluates_the_starting_policy_as_step_0(tmp_path):
    config = tiny(eval__sources=("synthetic:arithmetic",), eval__max_examples=4, eval__at_start=True,
                  train__num_steps=1)
    train.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert [r["step"] for r in read_metrics(str(tmp_path), kind="eval")] == [0, 1]
    assert os.path.exists(tmp_path / "eval" / "arithmetic_step0.jsonl")


# ---------------------------------------------------------------- CFPO vs GRPO


def test_cfpo_and_grpo_first_update_equal_on_policy_and_differ_off_policy(tmp_path):
    runs = {}
    for objective in ("cfpo", "ppo"):
        for epochs in (1, 4):
            config = tiny(rl__objective=objective, rl__num_epochs=epochs, train__num_steps=1,
                          train__export_hf=objective == "cfpo" and epochs == 1)
            runs[objective, epochs] = params_of(
                train.run(config, str(tmp_path / f"{objective}{epochs}"), devices=jax.devices()[:1]))
    # One epoch, one minibatch: both gradients are A·∇logp at r = 1, so Adam's first step agrees.
    assert max_diff(runs["cfpo", 1], runs["ppo", 1]) < 1e-6
    # Four epochs: later epochs see r != 1, where the quadratic penalty and the clip differ.
    assert max_diff(runs["cfpo", 4], runs["ppo", 4]) > 1e-4
    # The exported Hugging Face directory holds the trained policy.
    from flax import nnx

    from cfpo_jax import models

    exported = models.from_pretrained(str(tmp_path / "cfpo1" / "hf"))
    assert max_diff(jax.tree.leaves(jax.device_get(nnx.state(exported, nnx.Param))),
                    runs["cfpo", 1]) == 0.0


# ---------------------------------------------------------------- sharding


def test_one_and_eight_devices_and_micro_batches_give_the_same_losses(tmp_path):
    """Same first steps on 1 device (whole minibatch, and in 2 micro-batches) and on 8 devices
    (fsdp 8, fsdp 4 × tensor 2); with β > 0 and a per-sequence aggregation, so the KL term and the
    global denominators are exercised too."""
    losses = {}
    for name, (fsdp, tensor, micro, devices) in {
        "1": (1, 1, 0, jax.devices()[:1]),
        "1-micro": (1, 1, 8, jax.devices()[:1]),
        "fsdp8": (8, 1, 8, jax.devices()),
        "fsdp4xtensor2": (4, 2, 8, jax.devices()),
    }.items():
        config = tiny(mesh__fsdp=fsdp, mesh__tensor=tensor, rl__micro_batch_size=micro,
                      rl__beta=0.1, rl__agg="seq-mean-token-mean", train__num_steps=2)
        train.run(config, str(tmp_path / name), devices=devices)
        losses[name] = [(m["loss"], m["grad_norm"], m["kl_ref"], m["reward_mean"])
                        for m in read_metrics(str(tmp_path / name))]
    assert losses["1"][1][2] > 0  # the second step's policy has moved away from the reference
    for name in ("1-micro", "fsdp8", "fsdp4xtensor2"):
        np.testing.assert_allclose(losses[name], losses["1"], rtol=1e-4, atol=1e-6, err_msg=name)


def test_packed_learner_equals_unpacked_on_one_and_eight_devices(tmp_path, monkeypatch):
    """rl.pack: the same minibatches (one host permutation per epoch), packed, give the unpacked
    run's losses, gradient norms, KL, entropy and clip fraction over two steps of 2 epochs × 2
    minibatches (off policy, so the old-logprob and reference passes are packed too); on 8
    devices (fsdp 8, micro-batches of 8 packed rows) as on one."""
    from cfpo_jax import packing

    # These rows are one sequence per packed row (a prompt is over half the row width), where the
    # learner would take the unpacked layout: force the packed programs, which are under test.
    monkeypatch.setattr(packing, "saves_rows", lambda plan, num_sequences: True)
    results = {}
    for name, (pack, fsdp, micro, devices) in {
        "unpacked": (False, 1, 0, jax.devices()[:1]),
        "packed": (True, 1, 0, jax.devices()[:1]),
        "packed-fsdp8-micro": (True, 8, 8, jax.devices()),
    }.items():
        config = tiny(rl__pack=pack, mesh__fsdp=fsdp, rl__micro_batch_size=micro, rl__beta=0.1,
                      rl__agg="seq-mean-token-mean", rl__num_epochs=2, rl__num_minibatches=2,
                      sampling__max_new_tokens=6, train__num_steps=2)
        train.run(config, str(tmp_path / name), devices=devices)
        metrics = read_metrics(str(tmp_path / name))
        results[name] = [(m["loss"], m["grad_norm"], m["kl_ref"], m["entropy"], m["clip_frac"],
                          m["ratio_dev"], m["reward_mean"]) for m in metrics]
        if pack:
            assert all(m["learner_shapes"] >= 2 for m in metrics)  # prepare's and update's
            assert all(m["packed_rows_frac"] == 1.0 for m in metrics)  # forced: as many rows
    assert results["unpacked"][1][0] != 0 and results["unpacked"][1][5] > 0
    for name in ("packed", "packed-fsdp8-micro"):
        np.testing.assert_allclose(results[name], results["unpacked"], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_non_finite_update_is_skipped_and_never_checkpointed(tmp_path):
    from flax import nnx

    from cfpo_jax import models, tiny as tiny_lib

    config = tiny()
    path = tiny_lib.build(str(tmp_path / "model"), seed=0, **config.model.tiny.to_dict())
    graphdef, params, frozen = nnx.split(models.from_pretrained(path), nnx.Param, ...)
    tx, schedule = state_lib.make_optimizer(config.optim, 10)
    state = dict(params=params, opt_state=tx.init(params), rng=jax.random.key(0),
                 step=np.int32(0), updates=np.int32(0), skipped_updates=np.int32(0))
    off_policy = config.copy_and_resolve_references()
    off_policy.rl.num_epochs = 2
    update = jax.jit(learner.make_update(graphdef, tx, schedule, off_policy.rl, temperature=1.0,
                                         max_len=3, micro_batch_size=0, packed=False))
    rng = np.random.default_rng(0)
    batch = batch_lib.Batch(tokens=rng.integers(3, 50, (4, 8)).astype(np.int32),
                            attn=np.ones((4, 8), np.int32), mask=np.ones((4, 3), np.float32),
                            old_logp=np.full((4, 3), -3.0, np.float32),
                            adv=np.array([1.0, np.nan, -1.0, 0.5], np.float32))
    before = jax.tree.leaves(jax.device_get(params))
    new_state, metrics = update(state, frozen, batch)
    assert int(new_state["skipped_updates"]) == 1 and int(new_state["updates"]) == 0
    assert float(metrics["update_skipped"]) == 1.0
    assert max_diff(jax.tree.leaves(jax.device_get(new_state["params"])), before) == 0.0
    batch = batch.replace(adv=np.array([1.0, 0.25, -1.0, 0.5], np.float32))
    new_state, _ = update(new_state, frozen, batch)
    assert int(new_state["skipped_updates"]) == 1 and int(new_state["updates"]) == 1

    manager = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=1, keep=2)
    poisoned = dict(new_state, params=jax.tree.map(lambda x: x * np.nan, new_state["params"]))
    assert not manager.save(1, poisoned, {}, force=True)
    assert manager.save(2, new_state, {}, force=True)
    manager.wait()
    assert manager.latest_step() == 2
    manager.close()


# ---------------------------------------------------------------- preemption


def _launch(workdir, *overrides):
    args = [sys.executable, "-m", "cfpo_jax.train", f"--config={QUICKSTART}", f"--workdir={workdir}",
            "--config.data.batch_size=4", "--config.rl.group_size=4",
            "--config.sampling.max_new_tokens=3", "--config.warmstart.steps=0",
            "--config.train.num_steps=6", "--config.train.checkpoint_every=2",
            "--config.train.tensorboard=False", f"--config.rewards.fns=('{DENSE_REWARD}',)",
            "--config.optim.schedule=constant", "--config.eval.sources=()",
            *overrides]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def restore_like(ckpts, step, reference_state):
    """The state of checkpoint `step` in directory `ckpts`, placed like `reference_state`."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            reference_state)
    manager = checkpoint.Checkpointer(str(ckpts), every=2, keep=3)
    assert manager.latest_step() == step
    restored, _ = manager.restore(step, abstract)
    manager.close()
    return restored


def _wait_for(predicate, process, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"process ended early:\n{process.stdout.read()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("timed out")


def test_resume_after_sigkill_and_sigterm_matches_an_uninterrupted_run(tmp_path):
    workdir = tmp_path / "preempted"
    ckpts = workdir / "checkpoints"

    # 1. SIGKILL once the first checkpoint is complete (orbax renames it into place when done).
    first = _launch(workdir)
    _wait_for(lambda: ckpts.is_dir() and any(d.isdigit() for d in os.listdir(ckpts)), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    # The killed run may have logged steps after its checkpoint: wait for a record of the restart.
    records_before_restart = len(read_metrics(str(workdir)))

    # 2. Restart: it resumes from that checkpoint; SIGTERM while it runs → checkpoint, exit 0.
    # (A constant learning rate does not depend on num_steps, so a longer run is the same run.)
    second = _launch(workdir, "--config.train.num_steps=1000")
    lines = []
    _wait_for(lambda: lines.append(second.stdout.readline()) or "resumed from step" in lines[-1],
              second)
    assert f"resumed from step {killed_at}" in lines[-1]
    _wait_for(lambda: len(read_metrics(str(workdir))) > records_before_restart, second)
    second.send_signal(signal.SIGTERM)
    output = second.communicate(timeout=240)[0]
    assert second.returncode == 0, output
    assert "SIGTERM: saved step" in output, output
    stopped_at = int(output.split("SIGTERM: saved step")[1].split()[0])
    assert killed_at < stopped_at < 6 and str(stopped_at) in os.listdir(ckpts)

    # 3. Run to the end.
    third = _launch(workdir)
    output = third.communicate(timeout=240)[0]
    assert third.returncode == 0, output
    assert f"resumed from step {stopped_at}" in output

    # The same run without interruptions, in this process (same 8 devices, same seed).
    reference = train.run(tiny(train__num_steps=6, train__checkpoint_every=2), str(tmp_path / "ref"))
    resumed = restore_like(ckpts, 6, reference["state"])
    assert max_diff(params_of({"state": resumed}), params_of(reference)) <= 1e-6
    steps = [m["step"] for m in read_metrics(str(workdir))]
    assert steps[-1] == 6 and set(steps) == set(range(1, 7))


# ---------------------------------------------------------------- clear errors


def test_unknown_config_field_fails_with_the_valid_names():
    config = tiny()
    config.rl.unlock()
    config.rl.epochs = 4
    with pytest.raises(ValueError, match=r"unknown field 'rl.epochs'.*num_epochs"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match=r"rl.objective='grpo'; valid: \['cfpo', 'ppo'\]"):
        config_lib.validate(tiny(rl__objective="grpo"))
    with pytest.raises(TypeError):
        tiny(rl__num_epochs="four")  # the schema types its fields at assignment


def test_bad_override_on_the_command_line_exits_with_the_valid_names():
    result = subprocess.run(
        [sys.executable, "-m", "cfpo_jax.train", "--config.rl.epochs=4"], cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Did you mean \"num_epochs\"" in result.stderr and "Traceback" not in result.stderr
    assert "valid fields of rl:" in result.stderr


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_run" / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "cfpo_jax.evaluate", f"--config={QUICKSTART}",
         "--config.eval.sources=('synthetic:arithmetic',)", f"--config.eval.checkpoint={missing}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"{str(missing)!r} is not a directory holding a Hugging Face checkpoint" in result.stderr


def test_dataset_without_its_answer_field_is_a_clear_error(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "What is 1 + 1?", "solution": "2"}) + "\n")
    config = tiny(data__source=f"jsonl:{rows}")
    with pytest.raises(ValueError, match=r"row 0 has no field 'answer'"):
        train.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])


# ---------------------------------------------------------------- the learner on device


def _stages(tmp_path, config, devices):
    """Stage 1 of the trainer on its own: (parts, state, the first batch of prompts)."""
    from cfpo_jax import metrics

    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every=100, keep=1)
    progress = metrics.Progress(1, enabled=False)
    parts, state = train.build(config, str(tmp_path), devices=devices, ckpt=ckpt, progress=progress)
    ckpt.close()
    return parts, state, next(parts.iterator)


@pytest.mark.parametrize("pack", [False, True])
def test_learner_compiles_once_and_keeps_the_step_on_device(tmp_path, pack):
    """Three RL steps of 2 epochs × 2 minibatches with β > 0 on one device (where the optimiser's
    step counts used to come back in another sharding): `update` compiles once (packed: once per
    packed shape the learner planned), and everything after scoring runs with implicit
    host/device transfers disallowed."""
    config = tiny(rl__num_epochs=2, rl__num_minibatches=2, rl__beta=0.1, rl__pack=pack)
    parts, state, prompts = _stages(tmp_path, config, jax.devices()[:1])
    compiled = []

    def on_compile(event, duration, fun_name="", **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        for step in range(3):
            next_rng, sample_key = parts.learner.split_rng(state["rng"])
            # The same prompts each step, so every step has the same shapes.
            rollout = parts.rollout(state, prompts, sample_key)
            with jax.transfer_guard("disallow"):
                state, update_metrics = parts.learner.learn(state, rollout.batch,
                                                            rollout.lengths_Bx2, step)
                state = parts.learner.finish_step(state, next_rng)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)
    if pack:
        shapes = parts.learner.packer.learner_shapes
        packed = {shape for kind, shape in shapes if kind == "update"}
        unpacked = {shape for kind, shape in shapes if kind == "update unpacked"}
        expected = ["jit(update)"] * (len(packed) + len(unpacked))
    else:
        expected = ["jit(update)"]
    assert sorted(name for name in compiled if "update" in name) == expected, compiled
    assert len(update_metrics) == 4
    assert jax.device_get(state["updates"]) == 12 and jax.device_get(state["step"]) == 3


def test_learner_packs_only_where_it_saves_rows():
    """packing.Packer: a minibatch of short sequences is packed into fewer rows; one where every
    sequence is full length gets no plan (the unpacked layout, no gathers), and both are
    counted in the learner_shapes and packed_rows_frac metrics."""
    packer = packing.Packer(granule=1)
    P, N, S = 16, 3, 8
    rows_S = np.arange(S)
    # 2 prompt + 1 completion tokens: a 19-column row holds 3 (its N = 3 completion slots bind)
    short = np.tile([[2, 1]], (16, 1)).astype(np.int32)
    full = np.tile([[P, N]], (16, 1)).astype(np.int32)
    plan = packer.plan(short, rows_S, "update", prompt_width=P, completion_width=N)
    assert plan is not None and plan.segment_RxW.shape == (3, P + N)  # 8 sequences in 3 rows
    assert packer.plan(full, rows_S, "update", prompt_width=P, completion_width=N) is None
    assert packer.learner_shapes == {("update", (3, P + N, N)), ("update unpacked", (S, P + N, N))}
    assert packer.metrics() == dict(learner_shapes=2, packed_rows_frac=(3 + S) / (2 * S))
    assert packer.metrics()["packed_rows_frac"] == 1.0  # nothing planned since


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_rollout_plans_packing_only_for_a_prepare_pass_that_runs_the_model(tmp_path, beta):
    """rl.pack on policy: with β = 0 the prepare pass runs no model (the sampler's logprobs are
    the old policy's), so the rollout makes no plan and records no prepare shape; with β > 0 the
    reference forward runs, and its rollout is planned."""
    config = tiny(rl__num_epochs=1, rl__num_minibatches=1, rl__beta=beta, rl__pack=True)
    parts, state, prompts = _stages(tmp_path, config, jax.devices()[:1])
    _, sample_key = parts.learner.split_rng(state["rng"])
    parts.rollout(state, prompts, sample_key)
    kinds = {kind for kind, _ in parts.learner.packer.learner_shapes}
    if beta == 0:
        assert kinds == set()
    else:  # packed, or unpacked where packing saves no row: planned either way
        assert kinds in ({"prepare"}, {"prepare unpacked"})


def test_on_policy_update_reuses_its_own_logprobs_with_unchanged_losses(tmp_path):
    """num_epochs = num_minibatches = 1: the rollout runs no old-logprob forward (no matrix
    product at all with β = 0), and the update gives the losses, gradients and parameters of the
    update that reads old logprobs recomputed in a separate forward."""
    import jax.numpy as jnp

    from cfpo_jax import sampling

    config = tiny(rl__num_epochs=1, rl__micro_batch_size=8, rl__pack=False)
    parts, state, prompts = _stages(tmp_path, config, jax.devices()[:1])
    _, sample_key = parts.learner.split_rng(state["rng"])
    batch = parts.rollout(state, prompts, sample_key).batch
    assert batch.old_logp is None and batch.sampler_logp is not None
    rows, width = batch.tokens.shape
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
    samples = sampling.Samples(
        prompt_tokens=spec((rows, width - 3)), prompt_mask=spec((rows, width - 3)),
        tokens=spec((rows, 3)), mask=spec((rows, 3)), logprobs=spec((rows, 3), jnp.float32),
        lengths=spec((rows,)), eos=spec((rows,), bool))
    prepare_jaxpr = jax.make_jaxpr(parts.learner.programs["prepare"])(
        state["params"], None, parts.policy.frozen, samples, spec((rows,), jnp.float32), None)
    assert "dot_general" not in str(prepare_jaxpr)

    graphdef, frozen = parts.policy.graphdef, parts.policy.frozen
    logprobs = jax.jit(learner.make_logprobs(graphdef, frozen, temperature=1.0,
                                             micro_batch_size=8, num_new=3))
    old_logp, _ = logprobs(state["params"], batch.tokens, batch.attn)
    recomputed = dataclasses.replace(batch, sampler_logp=None, old_logp=old_logp)
    # The same update, built for the off-policy layout (old logprobs read from the batch).
    off_policy = config.copy_and_resolve_references()
    off_policy.rl.num_epochs = 2
    tx, schedule = state_lib.make_optimizer(config.optim, state_lib.total_updates(config))
    reference_update = jax.jit(learner.make_update(
        graphdef, tx, schedule, off_policy.rl, temperature=1.0, max_len=3, micro_batch_size=8,
        packed=False))
    state_copy = jax.tree.map(jnp.copy, state)
    on_policy_state, on_policy = jax.device_get(
        parts.learner.programs["update"](state, frozen, batch))
    recomputed_state, reference = jax.device_get(reference_update(state_copy, frozen, recomputed))
    for key in ("loss", "grad_norm", "clip_frac", "ratio_dev"):
        np.testing.assert_allclose(on_policy[key], reference[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert on_policy["grad_norm"] > 0
    # Adam's first step moves each parameter by about ±lr whatever the gradient's size, so a
    # rounding-level gradient difference shows up at most as a sliver of that step.
    step_size = config.optim.lr
    assert max_diff(jax.tree.leaves(on_policy_state["params"]),
                    jax.tree.leaves(recomputed_state["params"])) < 0.01 * step_size


@pytest.mark.parametrize("name, overrides, rtol, rows_off", [
    # GSPO-style sequence ratio under dual-clip PPO with clip-higher, RLOO advantages, two
    # epochs × two minibatches (off policy from the second update on).
    ("sequence-dualclip-rloo", dict(rl__objective="ppo", rl__level="sequence", rl__dual_clip=3.0,
                                    rl__eps_high=0.28, rl__estimator="rloo",
                                    rl__num_minibatches=2), 1e-4, 0),
    # bf16 compute over fp32 master weights, CFPO with three epochs, Dr.GRPO's aggregation,
    # micro-batches of 8. bf16 sums in another order on 8 devices: a bf16 tolerance, and after
    # the first update one of the second rollout's 16 completions may come out otherwise.
    ("bf16-cfpo-epochs", dict(model__dtype="bfloat16", rl__num_epochs=3, rl__micro_batch_size=8,
                              rl__agg="seq-mean-token-sum-norm", rl__estimator="drgrpo"), 3e-2, 1),
    # The alignment setting: KL folded into RLOO rewards (issue 14), two epochs.
    ("kl-in-reward-rloo", dict(rl__beta=0.1, rl__kl_in_reward=True, rl__estimator="rloo",
                               rl__num_epochs=2), 1e-4, 0),
])
def test_trainer_variants_agree_on_one_and_eight_devices(tmp_path, name, overrides, rtol,
                                                         rows_off):
    """Short runs of less common settings end to end: finite, every update applied, and the
    8-device (fsdp 8) run gives the one-device run's numbers."""
    results = {}
    for devices in (jax.devices()[:1], jax.devices()):
        workdir = str(tmp_path / f"{name}-{len(devices)}")
        config = tiny(train__num_steps=2, **overrides)
        result = train.run(config, workdir, devices=devices)
        metrics = read_metrics(workdir)
        results[len(devices)] = [(m["loss"], m["grad_norm"], m["reward_mean"], m["entropy"])
                                 for m in metrics]
        updates_per_step = config.rl.num_epochs * config.rl.num_minibatches
        assert int(result["state"]["updates"]) == 2 * updates_per_step
        assert int(result["state"]["skipped_updates"]) == 0
    assert np.all(np.isfinite(results[1]))
    one, eight = np.array(results[1]), np.array(results[8])
    np.testing.assert_allclose(eight[:, [0, 1, 3]], one[:, [0, 1, 3]], rtol=rtol, atol=1e-5)
    # The reward is the mean of 4 × 4 per-completion scores in [0, 1].
    np.testing.assert_allclose(eight[:, 2], one[:, 2], rtol=0, atol=rows_off / 16 + 1e-6)


def test_model_remat_reaches_the_update_and_cuts_its_compiled_memory(tmp_path):
    """`config.model.remat` / `remat_policy` reach the trainer's model: XLA's compiled temporary
    memory of the trainer's update (abstract state and batch, one device) drops with remat by at
    least the float32 [B, heads, T, T] attention probabilities every layer keeps without it."""
    from flax import nnx

    from cfpo_jax import sharding

    B, P, N = 8, 128, 128

    def temp_bytes(**model):
        config = tiny(model__tiny__num_layers=4, rl__num_epochs=2, **model)
        mesh = sharding.make_mesh(devices=jax.devices()[:1])
        policy = policy_lib.load(config, str(tmp_path), mesh)
        model_config = nnx.merge(policy.graphdef, policy.params, policy.frozen).config
        assert (model_config.remat, model_config.remat_policy) == (config.model.remat, config.model.remat_policy)
        tx, schedule = state_lib.make_optimizer(config.optim, 10)
        _, state = state_lib.create_state(policy.params, tx, mesh, seed=0, beta=0.0)
        batch = batch_lib.spec(config.rl, rows=B, prompt_width=P, completion_width=N, packed=False,
                               sharding=None)
        update = jax.jit(learner.make_update(policy.graphdef, tx, schedule, config.rl,
                                             temperature=1.0, max_len=N, micro_batch_size=0,
                                             packed=False))
        compiled = update.lower(state, policy.frozen, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes, model_config

    off, model_config = temp_bytes(model__remat=False)
    full, _ = temp_bytes(model__remat=True, model__remat_policy="full")
    dots, _ = temp_bytes(model__remat=True, model__remat_policy="dots_with_no_batch_dims")
    probs_bytes = model_config.num_layers * B * model_config.num_heads * (P + N) ** 2 * 4
    assert off - full >= probs_bytes, (off, full)
    assert full < dots < off, (full, dots, off)
