"""Checkpoints: orbax `CheckpointManager` with async saves, keep-last-K and resume.

A checkpoint at step s (directory `<workdir>/checkpoints/<s>`) holds two items:
  * `state`: the training-state pytree (params, optimiser state, step, rng) — sharded arrays are
    written by every host and restored straight into the shardings of the abstract target;
  * `meta`: JSON (the data iterator state and anything else the host loop needs to resume).
Orbax writes into a temporary directory and renames it when complete, so a run killed mid-save
leaves a half-written directory that `latest_step` never reports (and that the next start removes).

A checkpoint never holds non-finite values: `save` refuses a state with NaN/inf and returns False.

Faults:
* a complete-looking checkpoint can still be damaged later (a truncated file, a flipped byte; orbax
  restores a flipped byte of array data without complaint). `meta` therefore carries an integrity
  record: per state leaf an order-independent checksum of its bits (wrapping uint32 sums, so any
  sharding gives the same value), and a SHA-256 of the rest of `meta`. `restore_latest` restores
  the newest checkpoint that loads and matches its record; a bad one is renamed
  `<step>.corrupt` (kept for inspection, no longer a step) with a warning naming it, and the
  previous one is used. Never a silent restart from step 0: if checkpoints exist but none is
  good, it raises.
* a state some processes hold none of (a disaggregated run whose sampler is a process of its own:
  `host_copy=True`): orbax refuses jax arrays that one process holds whole in a multi-process run
  (it takes them for pmap's host-local arrays) and writes host arrays from process 0 only, so the
  state is broadcast to every process as numpy (PRNG keys as their key data), written by process
  0, and restored as numpy on every process, then placed into the state's shardings (a process
  without them gets arrays without a local shard). The broadcast costs a host copy of the state
  per save: fine for the one-learner-process runs this layout allows (as many sampler as learner
  devices). Such a checkpoint resumes in the same layout.
* a failing write (disk full, permissions) raises `CheckpointError` naming the step and the
  directory, from `save` or from the next `wait`/`save` for an asynchronous one; orbax writes into
  a temporary directory, so the previous checkpoints stay intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cfpo_jax import sharding

log = logging.getLogger(__name__)

_INTEGRITY = "integrity"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the previous ones are intact) or none can be restored."""


def _leaf_checksum(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
        bits = bits.astype(jnp.uint32)  # 64-bit leaves: their low words (enough to detect)
    positions = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, 0) if bits.ndim else 0
    for axis in range(1, bits.ndim):  # the flat position, from iotas (fused, never stored)
        positions = positions * jnp.uint32(bits.shape[axis]) + jax.lax.broadcasted_iota(
            jnp.uint32, bits.shape, axis)
    return jnp.sum(bits * (positions % 65536 + 1), dtype=jnp.uint32)


def _finite_and_checksums(leaves):
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats])) if floats else True
    return finite, jnp.stack([_leaf_checksum(x) for x in leaves])


# One compiled program for the whole state: one launch and one host sync per save. Eager
# per-leaf reductions were one cross-device collective each, hundreds per save; with them a CI
# run on 8 fake CPU devices aborted inside one, and 2-process runs hung after a step. Neither
# has recurred since (tests/integration/test_train.py variants, tests/integration/test_multihost.py).
_integrity = jax.jit(_finite_and_checksums)


def integrity(tree) -> tuple[bool, list[int]]:
    """(every floating-point leaf is finite, per-leaf checksums): per leaf, the wrapping uint32
    sum of its bits × (1 + flat position mod 2^16), so a flipped byte or two swapped values
    change it; exact whatever the sharding (integer sums commute)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return True, []
    finite, checksums = jax.device_get(_integrity(leaves))
    return bool(finite), [int(v) for v in np.asarray(checksums)]


def _meta_digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


class Checkpointer:
    """Saves every `every` steps (or when forced), keeps the last `keep`, restores the latest."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True,
                 host_copy: bool = False):
        """`host_copy`: the state as numpy, for a state some processes hold none of (module doc)."""
        self.directory = os.path.abspath(directory)
        self._host_copy = host_copy
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

    def due(self, step: int) -> bool:
        """Whether `save` at `step` would write without `force` (every `every` steps)."""
        return self._manager.should_save(step)

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save when `step` is due (or `force`); False if skipped or non-finite.
        Raises CheckpointError when this write (or the previous asynchronous one) fails."""
        if not force and not self._manager.should_save(step):
            return False
        if self._host_copy:
            state = _to_host(state)
        finite, checksums = self._integrity(state)
        if not finite:
            print(f"checkpoint: step {step} holds non-finite values; not saved", flush=True)
            return False
        meta = dict(meta)
        meta[_INTEGRITY] = {"state": checksums, "meta_sha256": _meta_digest(meta)}
        try:
            return self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
        except Exception as e:
            raise CheckpointError(self._write_failure(step, e)) from e

    def _integrity(self, state):
        """`integrity`; of a host copy on this process's devices, whatever mesh is in context
        (one this process may hold none of)."""
        if not self._host_copy:
            return integrity(state)
        with jax.set_mesh(sharding.make_mesh(devices=jax.local_devices())):
            return integrity(state)

    def _write_failure(self, step, error) -> str:
        return (f"checkpoint write failed in {self.directory} (step {step} or the asynchronous "
                f"save before it): {type(error).__name__}: {error}. The previous checkpoints "
                f"are intact (latest complete: {self._manager.latest_step()}).")

    def restore(self, step: int, abstract_state):
        """(state, meta) of checkpoint `step`, placed like `abstract_state` (ShapeDtypeStructs
        with shardings, e.g. from `jax.eval_shape` + the training shardings). Raises
        CheckpointError when it does not match its integrity record."""
        target = _host_target(abstract_state) if self._host_copy else abstract_state
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        state, meta = restored["state"], dict(restored["meta"])
        record = meta.pop(_INTEGRITY, None)
        place = (lambda tree: jax.tree.map(_placed, tree, abstract_state)) if self._host_copy \
            else (lambda tree: tree)
        if record is None:  # written before integrity records existed
            log.warning("checkpoint %s/%s has no integrity record; restored unverified",
                        self.directory, step)
            return place(state), meta
        if record["meta_sha256"] != _meta_digest(meta):
            raise CheckpointError(f"checkpoint {self.directory}/{step}: meta does not match its "
                                  "checksum")
        # (A host copy is checked as numpy, on every process: the same checksums.)
        if record["state"] != self._integrity(state)[1]:
            raise CheckpointError(f"checkpoint {self.directory}/{step}: state arrays do not match "
                                  "their checksums")
        return place(state), meta

    def restore_latest(self, abstract_state):
        """(step, state, meta) of the newest checkpoint that restores intact, or None when there
        are none. Damaged ones are renamed `<step>.corrupt` with a warning naming each; raises
        CheckpointError if checkpoints exist and none restores."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        for step in steps:
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many kinds)
                bad = os.path.join(self.directory, str(step))
                log.warning("checkpoint %s cannot be restored (%s: %s); moving it to %s.corrupt "
                            "and trying the previous one", bad, type(e).__name__,
                            str(e).splitlines()[0][:300] if str(e) else "", bad)
                print(f"checkpoint: {bad} is damaged ({type(e).__name__}); moved to "
                      f"{bad}.corrupt, trying the previous one", flush=True)
                self._quarantine(step)
                continue
            return step, state, meta
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be "
                                  "restored (each moved to <step>.corrupt); refusing to restart "
                                  "from step 0 over them")
        return None

    def _quarantine(self, step: int):
        if jax.process_index() == 0:
            bad = os.path.join(self.directory, str(step))
            target = bad + ".corrupt"
            suffix = 1
            while os.path.exists(target):
                target, suffix = f"{bad}.corrupt{suffix}", suffix + 1
            os.replace(bad, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Until the asynchronous save is written; CheckpointError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(self._write_failure("pending", e)) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs of `state` carrying `shardings` (a matching pytree): a restore target."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings
    )


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_host(state):
    """`state` as numpy on every process (`sharding.fetch`: broadcast from the processes that
    hold it), PRNG keys as their key data."""
    return sharding.fetch(jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                                       state))


def _host_target(abstract_state):
    """`_to_host`'s numpy tree for `abstract_state` (the restore target of a host copy)."""
    key_shape = jax.random.key_data(jax.random.key(0)).shape

    def host(x):
        if _is_key(x):
            return np.zeros((*x.shape, *key_shape), np.uint32)
        return np.zeros(x.shape, x.dtype)
    return jax.tree.map(host, abstract_state)


def _placed(host, abstract):
    """A host copy's leaf in `abstract`'s sharding (a PRNG key of the default implementation
    rebuilt from its data)."""
    host = np.asarray(host)
    with jax.transfer_guard_host_to_device("allow"):
        x = jax.make_array_from_callback(host.shape, abstract.sharding, lambda index: host[index],
                                         dtype=host.dtype)
    return jax.random.wrap_key_data(x) if _is_key(abstract) else x
