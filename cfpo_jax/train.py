"""`python -m cfpo_jax.train --config=<name or path>.py[:arg] [--workdir=DIR] [--config.x.y=v]`.

The entry point and the loop, read top to bottom in the order a run happens (ARCHITECTURE.md,
"Data flow"); the parts live in their own modules:

  1. build   `policy` (mesh, model, tokenizer), `state` (optimiser, the state created in its
             shardings or restored from the latest checkpoint; on a fresh start the supervised
             warm start, `warmstart`, runs first), `learner` (the jitted programs), `rollout`
             (sampler or episodes, rewards), `hooks` (evaluation, export), the data iterator.
  2. loop    per RL step: rollout (sample → text → rewards → advantages, old and reference
             logprobs) → learn (num_epochs × num_minibatches jitted updates) → metrics →
             checkpoint → hooks. With `rl.max_staleness` = k >= 1 the rollout's sampling half
             comes from a producer thread at a fixed lag (`rollout.Lagged`), k steps older.
  3. stop    at num_steps, or on SIGTERM / SIGINT to any process: checkpoint, hooks' `on_end`.
  4. main    flags, the config found by name or path, validated once.

Nothing imports this module. One RL step's tensors stay on device: learning and the step's end
run under `jax.transfer_guard("disallow")`, so an implicit transfer there is an error.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from cfpo_jax import checkpoint, data, envs, hooks, learner, metrics, sharding, warmstart
from cfpo_jax import config as config_lib
from cfpo_jax import policy as policy_lib
from cfpo_jax import rollout as rollout_lib
from cfpo_jax import state as state_lib

# ============================================================================ 1. build


@dataclasses.dataclass
class Parts:
    """A built run: what the loop drives."""

    mesh: jax.sharding.Mesh  # the learner's (`rollout.mesh` is the sampler's)
    policy: policy_lib.Policy  # its `params` were donated to `state`
    learner: learner.Learner
    rollout: rollout_lib.Rollout
    hooks: list[hooks.Hook]
    iterator: data.PromptIterator
    restored_meta: dict | None = None  # the checkpoint's meta when the state was restored


def build(config, workdir: str, *, devices=None, ckpt: checkpoint.Checkpointer, progress):
    """Stage 1: (parts, state) — the state restored from `ckpt`'s latest checkpoint when there is
    one, else fresh (after the warm start when configured). `devices` restricts the meshes (tests
    compare 1 device with 8); default all devices. The state and the learner live on the learner
    mesh (`parts.mesh`), the rollout's sampler on the rollout mesh — the same one unless
    `mesh.rollout_devices` > 0 (`policy.make_meshes`)."""
    rollout_mesh, mesh = policy_lib.make_meshes(config, devices)
    # Every program (the warm start's too) is traced with the mesh in context: attention runs the
    # kernel of the mesh's platform, per shard (`models.attention`).
    with jax.set_mesh(mesh):
        policy = policy_lib.load(config, workdir, mesh)
        iterator = data.iterator_from_config(config, policy.tokenizer,
                                             tools=envs.prompt_tools(config.env))
        iterator.dataset[0]  # a row without the preset's fields fails now, not after compilation
        tx, schedule = state_lib.make_optimizer(config.optim, state_lib.total_updates(config))
        init, abstract_state = state_lib.create_state(
            policy.params, tx, mesh, seed=config.seed, beta=config.rl.beta,
            adapters=config.lora.rank > 0)
        state, meta = _restore(ckpt, abstract_state, policy.base_model, iterator, progress)
        if state is None:
            params = policy.params
            if config.warmstart.steps:
                params = warmstart.run(params, policy.graphdef, policy.frozen, config=config,
                                       train_iterator=iterator, tokenizer=policy.tokenizer,
                                       batch_sharding=sharding.batch_sharding(mesh),
                                       progress=progress)
            state = init(params)
        learner_ = learner.Learner(config, mesh, policy.graphdef, policy.frozen, pad_id=policy.pad_id,
                                   tx=tx, schedule=schedule,
                                   state_sh=jax.tree.map(lambda x: x.sharding, abstract_state))
        parts = Parts(mesh=mesh, policy=policy, learner=learner_,
                      rollout=rollout_lib.Rollout(config, rollout_mesh, policy, learner_),
                      hooks=hooks.from_config(config, workdir, policy, mesh), iterator=iterator,
                      restored_meta=meta)
    return parts, state


def _restore(ckpt, abstract_state, base_model, iterator, progress):
    """(state, meta) of the newest checkpoint that restores intact (damaged ones are set aside
    with a warning), with the data iterator put back where it was; (None, None) when there is
    none."""
    restored = ckpt.restore_latest(abstract_state)
    if restored is None:
        return None, None
    latest, state, meta = restored
    if meta.get("base_model") != base_model:
        raise ValueError(
            f"checkpoint {ckpt.directory}/{latest} holds adapters trained on the base model "
            f"{meta.get('base_model')}, but this run's base model is {base_model}")
    iterator.restore(meta["data"])
    progress.message(f"resumed from step {latest} ({ckpt.directory}/{latest})")
    return state, meta


# ============================================================================ 2. loop


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Trains per `config` into `workdir`; returns {'state', 'history', 'stopped_by'}."""
    config_lib.validate(config)
    sharding.initialize_distributed(config.mesh)  # before any other JAX call
    stop = _StopFlag().install()
    try:
        return _run(config, workdir, devices, stop)
    finally:
        stop.restore()


def _run(config, workdir, devices, stop):
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    # A sampler process of its own holds none of the state: it is checkpointed as a host copy.
    learner_mesh = policy_lib.make_mesh(config, devices)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
        host_copy=len({d.process_index for d in learner_mesh.devices.flat}) < jax.process_count())
    writer = metrics.MetricsWriter(workdir, tensorboard=config.train.tensorboard,
                                   wandb_project=config.train.wandb_project,
                                   config=config.to_dict(), enabled=is_main)
    progress = metrics.Progress(config.train.num_steps, every=config.train.log_every, enabled=is_main)
    parts, state = build(config, workdir, devices=devices, ckpt=ckpt, progress=progress)
    with jax.set_mesh(parts.mesh):
        try:
            return _loop(config, parts, state, ckpt, writer, progress, stop)
        finally:
            writer.close()
            parts.rollout.close()


def _loop(config, parts: Parts, state, ckpt, writer, progress, stop):
    num_steps = config.train.num_steps
    if parts.restored_meta is not None:
        rollout_lib.check_lag(parts.restored_meta, config.rl.max_staleness,
                              int(sharding.fetch(state["step"])))
    # rl.max_staleness >= 1: the rollouts come from a producer thread at a fixed lag.
    lagged = rollout_lib.Lagged(parts.rollout, parts.iterator, parts.learner, state,
                                num_steps=num_steps, restored_meta=parts.restored_meta) \
        if config.rl.max_staleness else None
    try:
        return _steps(config, parts, state, ckpt, writer, progress, stop, lagged)
    finally:
        if lagged is not None:
            lagged.close()


def _steps(config, parts: Parts, state, ckpt, writer, progress, stop, lagged):
    num_steps = config.train.num_steps

    def meta(step):
        queue = {} if lagged is None else lagged.meta(step)  # its "data": the producer's snapshot
        return {"data": parts.iterator.state, "base_model": parts.policy.base_model, **queue}
    view = lambda step, stopped_by=None: hooks.RunView(
        step=step, num_steps=num_steps, writer=writer, progress=progress, stopped_by=stopped_by,
        policy=lambda: nnx.merge(parts.policy.graphdef, state["params"], parts.policy.frozen))

    history = []
    step = int(sharding.fetch(state["step"]))
    for hook in parts.hooks:
        hook.on_start(view(step))
    # Stopping changes the collective program (a checkpoint now, no next step), so the processes
    # decide together: after each step, a stop signal to any process stops all of them.
    stopping = sharding.any_process(stop.signal is not None)
    while step < num_steps and not stopping:
        t0 = time.time()
        next_rng, sample_key = parts.learner.split_rng(state["rng"])
        # Dynamic sampling's further rounds take the iterator's next batches too, so its
        # position after the step (what the checkpoint holds) covers every prompt consumed.
        rollout = (parts.rollout(state, next(parts.iterator), sample_key,
                                 more_prompts=lambda: next(parts.iterator)) if lagged is None
                   else lagged.get(state, step))
        t_learn = time.time()
        with jax.transfer_guard("disallow"):
            state, update_metrics = parts.learner.learn(state, rollout.batch, rollout.lengths_Bx2, step)
            state = parts.learner.finish_step(state, next_rng)
        if lagged is not None:
            lagged.publish(step + 1, state)
        step_metrics = metrics.step_metrics(rollout.host_metrics, rollout.device_metrics,
                                            update_metrics, state)
        step_metrics.update(parts.learner.packing_metrics())
        step += 1
        step_metrics.update(rollout.times, time_learn_s=time.time() - t_learn,
                            time_step_s=time.time() - t0)
        writer.write(step, step_metrics)
        progress.update(step, step_metrics)
        history.append(dict(step=step, **step_metrics))

        stopping = sharding.any_process(stop.signal is not None)
        force = stopping or step == num_steps
        if (force or ckpt.due(step)) and ckpt.save(step, state, meta(step), force=force):
            progress.message(f"checkpoint {step} -> {ckpt.directory}/{step}")
        for hook in parts.hooks:
            hook.on_step_end(view(step))

    # ============================================================================ 3. stop
    stopped_by = stop.signal or ("a stop signal to another process" if stopping else None)
    if stopped_by is not None:
        # A signal before the first RL step (during compilation or the warm start) still leaves a
        # checkpoint of what was done.
        ckpt.wait()
        if ckpt.latest_step() != step:
            ckpt.save(step, state, meta(step), force=True)
        progress.message(f"{stopped_by}: saved step {step} and stopped")
    ckpt.close()
    for hook in parts.hooks:
        hook.on_end(view(step, stopped_by))
    return dict(state=state, history=history, stopped_by=stopped_by)


class _StopFlag:
    """SIGTERM / SIGINT → finish the current step, checkpoint, exit 0. A second signal acts as usual."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ============================================================================ 4. main


def _define_flags():
    """The command's flags, defined where they are parsed (nothing imports this module)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training config: a shipped config by name (quickstart.py, "
        "math_qwen.py:1.5b, ...) or a path[:arg]; default the quickstart.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where everything goes; overrides config.workdir.")


def _parse_flags(argv):
    """absl flag parsing with the config found by name (`config_lib.find`), the quickstart by
    default, and an unknown `--config.a.b` override reported with the valid names."""
    argv = config_lib.resolve_flag(argv, "config", default="quickstart.py")
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        message = str(e).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
        sys.stderr.write(f"error: {message}\n")
        for arg in argv:
            if arg.startswith("--config.") and "=" in arg:
                sys.stderr.write(config_lib.valid_fields_hint(arg))
        sys.exit(2)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or config.workdir
    if not workdir:
        sys.exit("error: no workdir: pass --workdir=DIR or set config.workdir")
    try:
        config_lib.validate(config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    history = run(config, workdir)["history"]
    if history:
        tenth = max(len(history) // 10, 1)
        first = np.mean([h["reward_mean"] for h in history[:tenth]])
        last = np.mean([h["reward_mean"] for h in history[-tenth:]])
        print(f"done: mean reward first tenth {first:.3f} -> last tenth {last:.3f}; "
              f"metrics in {os.path.join(workdir, 'metrics.jsonl')}", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
