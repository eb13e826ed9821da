"""Checkpoint faults: a damaged latest checkpoint, a failing write, a kill during an asynchronous
save. Each run against real orbax checkpoints on disk; expected values are written here."""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfpo_jax import checkpoint
from tests.fixtures import paths
from tests.fixtures.processes import free_port, process_env

REPO_ROOT = paths.ROOT


def _state(step):
    """A small training-state-like pytree whose values say which step wrote it."""
    return {"params": {"w": jnp.arange(1200.0, dtype=jnp.float32).reshape(12, 100) + step,
                       "b": jnp.full((7,), step, jnp.bfloat16)},
            "step": jnp.int32(step), "rng": jax.random.key_data(jax.random.key(step))}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _state(0))


def _write(directory, steps):
    ckpt = checkpoint.Checkpointer(str(directory), every=1, keep=5)
    for step in steps:
        assert ckpt.save(step, _state(step), {"data": {"position": step}})
    ckpt.close()


def _largest_data_file(step_dir):
    files = [p for p in glob.glob(f"{step_dir}/state/**/d/*", recursive=True) if os.path.isfile(p)]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_bytes(step_dir):  # orbax itself restores this without complaint: values change
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))


def _garbage(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.write(os.urandom(os.path.getsize(path)))


def _edit_meta(step_dir):  # valid JSON, different data position
    path = f"{step_dir}/meta/metadata"
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"position": 2', '"position": 9'))


FAULTS = {
    "truncated data": _truncate,
    "flipped byte": _flip_bytes,
    "garbage data": _garbage,
    "edited meta": _edit_meta,
    "missing meta": lambda d: os.remove(f"{d}/meta/metadata"),
    "empty array metadata": lambda d: open(f"{d}/state/_METADATA", "w").close(),
    "emptied directory": lambda d: [shutil.rmtree(d), os.makedirs(d)],
}


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_latest_resumes_from_the_previous_one_with_a_warning(fault, tmp_path, caplog):
    _write(tmp_path, [1, 2])
    FAULTS[fault](tmp_path / "2")
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=5)
    with caplog.at_level(logging.WARNING, logger="cfpo_jax.checkpoint"):
        step, state, meta = ckpt.restore_latest(_abstract())
    assert step == 1 and meta == {"data": {"position": 1}}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  np.arange(1200.0).reshape(12, 100) + 1)
    assert any(f"{tmp_path}/2 cannot be restored" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt"]
    # The run goes on from step 1 and writes step 2 again where the damaged one was.
    assert ckpt.save(2, _state(2), {"data": {"position": 2}})
    ckpt.close()
    step, _, meta = checkpoint.Checkpointer(str(tmp_path), every=1, keep=5).restore_latest(
        _abstract())
    assert (step, meta) == (2, {"data": {"position": 2}})


def test_no_restorable_checkpoint_is_an_error_not_a_restart(tmp_path):
    _write(tmp_path, [1, 2])
    for step in (1, 2):
        _truncate(tmp_path / str(step))
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=5)
    with pytest.raises(checkpoint.CheckpointError, match=r"none of the checkpoints \[2, 1\]"):
        ckpt.restore_latest(_abstract())
    assert checkpoint.Checkpointer(str(tmp_path / "empty"), every=1, keep=5).restore_latest(
        _abstract()) is None


def test_integrity_checksums_are_sharding_independent_and_sensitive_and_finiteness_is_checked():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    x = jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b")))
    assert checkpoint.integrity([x])[1] == checkpoint.integrity([sharded])[1]
    bits = np.asarray(x).view(np.uint32).astype(np.uint64)
    weights = np.arange(64, dtype=np.uint64) % 65536 + 1
    assert checkpoint.integrity([x])[1] == [int((bits.reshape(-1) * weights).sum() % 2**32)]
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert checkpoint.integrity([swapped])[1] != checkpoint.integrity([x])[1]
    # Finiteness over every floating leaf, sharded or not; integer and key leaves are ignored.
    key = jax.random.key(0)
    assert checkpoint.integrity([sharded, jnp.int32(7), key])[0] is True
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        poisoned = jax.device_put(x.at[5, 6].set(bad), sharded.sharding)
        assert checkpoint.integrity([x, poisoned, jnp.int32(7)])[0] is False


_WRITER = """
import os, resource, signal, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, {tests!r})
from test_checkpoint import _state
from cfpo_jax import checkpoint
ckpt = checkpoint.Checkpointer({directory!r}, every=1, keep=5)
ckpt.save(1, _state(1), {{"data": {{"position": 1}}}})
ckpt.wait()
mode = sys.argv[1]
if mode == "disk full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    try:
        ckpt.save(2, _state(2), {{"data": {{"position": 2}}}})
        ckpt.wait()
    except checkpoint.CheckpointError as e:
        print("ERROR", e, flush=True)
        sys.exit(3)
    print("NO ERROR", flush=True)
else:  # killed while the asynchronous save of a large step 2 is being written
    big = dict(_state(2), big=jnp.ones((4096, 8192), jnp.float32))
    ckpt.save(2, big, {{"data": {{"position": 2}}}})
    print("SAVING", flush=True)
    time.sleep(600)
"""


def _run_writer(tmp_path, mode):
    script = _WRITER.format(tests=os.path.dirname(os.path.abspath(__file__)),
                            directory=str(tmp_path / "ckpt"))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-c", script, mode], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_failing_write_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path):
    proc = _run_writer(tmp_path, "disk full")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, out + err[-3000:]
    assert "checkpoint write failed in" in out and "File too large" in out
    assert "latest complete: 1" in out
    step, state, meta = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=1,
                                                keep=5).restore_latest(_abstract())
    assert (step, meta) == (1, {"data": {"position": 1}})
    assert int(state["step"]) == 1


def test_kill_during_an_asynchronous_save_resumes_from_the_last_complete_one(tmp_path):
    proc = _run_writer(tmp_path, "kill")
    deadline = time.monotonic() + 300
    while proc.stdout.readline().strip() != "SAVING":
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)  # inside the 128 MiB write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [name for name in os.listdir(tmp_path / "ckpt") if name != "1"]
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=1, keep=5)
    step, state, meta = ckpt.restore_latest(_abstract())
    assert (step, meta) == (1, {"data": {"position": 1}}), leftovers
    np.testing.assert_array_equal(np.asarray(state["params"]["b"], np.float32), np.ones(7))
    ckpt.close()


_LEARNER_ONLY = """
import json, sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cfpo_jax import checkpoint, sharding

learner = Mesh(np.array(jax.devices()[2:]), ("fsdp",))  # process 1's devices only
shardings = dict(w=NamedSharding(learner, P("fsdp")), step=NamedSharding(learner, P()),
                 rng=NamedSharding(learner, P()))
state = jax.jit(lambda: dict(w=jnp.arange(8.0), step=jnp.int32(3), rng=jax.random.key(7)),
                out_shardings=shardings)()
ckpt = checkpoint.Checkpointer({directory!r}, every=2, keep=2, host_copy=True)
due = [ckpt.due(s) for s in (1, 2)]
saved = ckpt.save(2, state, dict(data=[1, 2]))
ckpt.wait()
latest = ckpt.latest_step()
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
step, restored, meta = ckpt.restore_latest(abstract)
ckpt.close()
local = [len(x.addressable_shards) for x in jax.tree.leaves(restored)]
values = sharding.fetch(dict(w=restored["w"], step=restored["step"],
                             rng=jax.random.key_data(restored["rng"])))
print(json.dumps(dict(due=due, saved=saved, latest=latest, step=step, meta=meta, local=local,
                      w=values["w"].tolist(), state_step=int(values["step"]),
                      rng=values["rng"].tolist(), want=jax.random.key_data(jax.random.key(7)).tolist())))
"""


def test_a_state_on_some_processes_is_saved_and_restored_as_a_host_copy(tmp_path):
    """2 processes, the state on process 1's devices only (a disaggregated run whose sampler is
    process 0; orbax refuses such arrays): saved as a host copy (`host_copy=True`), restored into
    the shardings — process 1 holds the values again, process 0 arrays of the right shapes without
    a local shard — with the step, the meta and the PRNG key; the values reach both
    (`sharding.fetch`)."""
    script = _LEARNER_ONLY.format(port=free_port(), directory=str(tmp_path / "ckpt"))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=process_env(2),
                              cwd=paths.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for process, result in enumerate(results):
        assert result["due"] == results[0]["due"] and result["saved"] is True
        assert result["latest"] == 2 and result["step"] == 2 and result["meta"] == {"data": [1, 2]}
        assert result["w"] == list(map(float, range(8))) and result["state_step"] == 3
        assert result["rng"] == result["want"]
        assert result["local"] == ([0, 0, 0] if process == 0 else [2, 2, 2])
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2"]
