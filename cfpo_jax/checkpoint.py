"""Checkpoints: orbax `CheckpointManager` with async saves, keep-last-K and resume.

A checkpoint at step s (directory `<workdir>/checkpoints/<s>`) holds two items:
  * `state`: the training-state pytree (params, optimiser state, step, rng) — sharded arrays are
    written by every host and restored straight into the shardings of the abstract target;
  * `meta`: JSON (the data iterator state and anything else the host loop needs to resume).
Orbax writes into a temporary directory and renames it when complete, so a run killed mid-save
leaves a half-written directory that `latest_step` never reports (and that the next start removes).

A checkpoint never holds non-finite values: `save` refuses a state with NaN/inf and returns False.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


def all_finite(tree) -> bool:
    """True when every floating-point leaf of `tree` is finite (one device reduction, one sync)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    if not leaves:
        return True
    return bool(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))


class Checkpointer:
    """Saves every `every` steps (or when forced), keeps the last `keep`, restores the latest."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save when `step` is due (or `force`); False if skipped or non-finite."""
        if not force and not self._manager.should_save(step):
            return False
        if not all_finite(state):
            print(f"checkpoint: step {step} holds non-finite values; not saved", flush=True)
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state):
        """(state, meta) of checkpoint `step`, placed like `abstract_state` (ShapeDtypeStructs
        with shardings, e.g. from `jax.eval_shape` + the training shardings)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs of `state` carrying `shardings` (a matching pytree): a restore target."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings
    )

