"""Device mesh, the one table of partition rules, and multi-host start-up.

Mesh axes:
* `data`: pure data parallelism (parameters replicated along it); with `dcn` slices it spans
  them (`make_mesh`).
* `fsdp`: data parallelism with parameters (and optimizer state) sharded along it (ZeRO-3 style;
  XLA all-gathers a layer's weights inside the scan when it needs them).
* `expert`: expert parallelism for mixture-of-experts models: each expert's weights live on one
  slice of this axis (`expert_*_kernel`), and the batch is split over it as over 'data', so the
  layers around the experts run data-parallel; tokens reach their experts inside the MoE layer
  (`cfpo_jax.models.moe`). Parameters that are not experts are replicated over it.
* `tensor`: Megatron-style tensor parallelism over attention heads, the MLP hidden size and the
  vocabulary.

`RULES` maps a parameter *kind* (its leaf name, see `cfpo_jax.models.transformer`) to the
PartitionSpec of one layer's parameter; parameters under `blocks` carry a leading layer axis,
which is never sharded. The table is the same for every model family. A low-rank adapter
(`q_lora_a [D, R]`, `q_lora_b [R, N, H]`, ...) follows its projection's rule: A takes the rule of
the kernel's input axes, B that of its output axes; the rank axis is never sharded. A dimension
that a mesh axis does not divide (e.g. 2 kv heads on tensor=4) is left unsharded rather than
failing, so any checkpoint runs on any mesh (logged at INFO).
"""

from __future__ import annotations

import contextlib
import json
import logging

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

RULES: dict[str, P] = {
    "embedding": P("tensor", "fsdp"),  # [V, D]
    "lm_head": P("fsdp", "tensor"),  # [D, V]
    "score": P("fsdp", None),  # [D, num_labels]: a reward model's head
    "q_kernel": P("fsdp", "tensor", None),  # [D, N, H]
    "k_kernel": P("fsdp", "tensor", None),  # [D, K, H]
    "v_kernel": P("fsdp", "tensor", None),  # [D, K, H]
    "o_kernel": P("tensor", None, "fsdp"),  # [N, H, D]
    "q_bias": P("tensor", None),  # [N, H]
    "k_bias": P("tensor", None),  # [K, H]
    "v_bias": P("tensor", None),  # [K, H]
    "gate_kernel": P("fsdp", "tensor"),  # [D, F]
    "up_kernel": P("fsdp", "tensor"),  # [D, F]
    "down_kernel": P("tensor", "fsdp"),  # [F, D]
    "router_kernel": P("fsdp", None),  # [D, E]: a MoE layer's router
    "expert_gate_kernel": P("expert", "fsdp", "tensor"),  # [E, D, F]
    "expert_up_kernel": P("expert", "fsdp", "tensor"),  # [E, D, F]
    "expert_down_kernel": P("expert", "tensor", "fsdp"),  # [E, F, D]
    "scale": P(None),  # RMSNorm weights: small, replicated
}

log = logging.getLogger(__name__)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None, *, expert: int = 1,
              dcn: int = 1) -> Mesh:
    """Mesh with axes ('data', 'fsdp', 'expert', 'tensor'); one size may be -1 (the remaining
    devices).

    `dcn` > 1: the devices are that many slices (TPU slices joined by the data-centre network;
    without slice ids, equal consecutive blocks of `devices`), and `data` spans them: its size is
    dcn × data, slice-major, every other axis inside one slice (the sizes given are per slice) —
    MaxText's DCN data parallelism. Parameters are replicated along `data`, so only the
    gradients' reduction crosses the slower network; FSDP gathers, expert exchanges and tensor
    collectives stay on the chips' interconnect."""
    devices = list(jax.devices() if devices is None else devices)
    if dcn < 1 or len(devices) % dcn:
        raise ValueError(f"mesh.dcn={dcn} must be >= 1 and divide the {len(devices)} devices into slices")
    per_slice = len(devices) // dcn
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    if any(s == 0 or s < -1 for s in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh sizes must be positive, with at most one -1; got {sizes}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
        if per_slice % known:
            raise ValueError(f"{per_slice} devices per slice are not divisible by the fixed mesh sizes {sizes}")
        sizes = {k: (per_slice // known if s == -1 else s) for k, s in sizes.items()}
    shape = tuple(sizes[a] for a in MESH_AXES)
    if int(np.prod(shape)) != per_slice:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices"
                         f"{' per slice' if dcn > 1 else ''}; have {per_slice}")
    if dcn == 1:
        try:
            device_array = mesh_utils.create_device_mesh(shape, devices)
        except (AssertionError, NotImplementedError, ValueError):
            device_array = np.asarray(devices).reshape(shape)
    else:
        try:
            device_array = mesh_utils.create_hybrid_device_mesh(shape, (dcn,) + (1,) * (len(shape) - 1), devices)
        except (AssertionError, AttributeError, NotImplementedError, ValueError):
            device_array = np.asarray(devices).reshape((dcn * shape[0],) + shape[1:])
    return Mesh(device_array, MESH_AXES)


def _leaf_names(path) -> list[str]:
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _rule(kind: str, ndim: int) -> tuple:
    """The spec of one layer's parameter of `kind` with `ndim` axes; adapters derive theirs."""
    target, lora, factor = kind.rpartition("_lora_")
    if not lora:
        return tuple(RULES[kind])
    kernel = tuple(RULES[f"{target}_kernel"])
    if factor == "a":  # [*in, R]
        return kernel[:ndim - 1] + (None,)
    if factor == "b":  # [R, *out]
        return (None,) + kernel[len(kernel) - ndim + 1:]
    raise KeyError(kind)


def partition_spec(mesh: Mesh, names: list[str], shape: tuple[int, ...]) -> P:
    """The rule for a parameter at state path `names`, with undividable dimensions unsharded."""
    kind = names[-1]
    stacked = names[0] == "blocks"
    try:
        spec = _rule(kind, len(shape) - stacked)
    except KeyError:
        raise KeyError(
            f"no partition rule for parameter {'/'.join(names)!r}; kinds: {', '.join(RULES)}"
        ) from None
    if stacked:
        spec = (None,) + spec
    if len(spec) != len(shape):
        raise ValueError(f"rule {P(*spec)} for {'/'.join(names)} does not fit shape {shape}")
    fitted = []
    for axis, dim in zip(spec, shape):
        if axis is not None and axis not in mesh.axis_names:  # e.g. no 'expert' axis in this mesh
            axis = None
        if axis is not None and dim % mesh.shape[axis]:
            log.info("%s: dim %d not divisible by mesh axis %s=%d; left unsharded",
                     "/".join(names), dim, axis, mesh.shape[axis])
            axis = None
        fitted.append(axis)
    return P(*fitted)


def param_shardings(mesh: Mesh, state):
    """NamedShardings with the structure of `state` (an nnx.State of arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(mesh, _leaf_names(path), x.shape)), state
    )


def shard_model(model, mesh: Mesh):
    """Moves every parameter of an NNX model to its sharding (in place); returns the model."""
    from flax import nnx

    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(mesh, state)))
    return model


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)` (nothing for None), around a program's jitted calls: tracing then sees
    the mesh, so attention picks the kernel of the mesh's platform and runs Pallas kernels per
    shard (`cfpo_jax.models.attention`)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp x expert, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch splits: the product of the mesh's batch axes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def to_host(tree):
    """Device pytree → numpy on every host; arrays spanning hosts are all-gathered (every process
    must call it then)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            # Under the array's own mesh, whatever the caller's (e.g. a rollout mesh's samples
            # while the learner's is in context).
            with mesh_context(getattr(x.sharding, "mesh", None)):
                x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))
    return jax.tree.map(get, tree)


def initialize_distributed(mesh_config) -> None:
    """`jax.distributed.initialize` when `mesh_config.distributed` (before any other JAX call).

    `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id` name the
    cluster by hand (e.g. several processes on one machine); left empty (""/0/-1) jax detects it
    from the launcher's environment (TPU pods, SLURM, Open MPI, Kubernetes). A second call is a
    no-op.
    """
    if not mesh_config.distributed or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=mesh_config.coordinator_address or None,
        num_processes=mesh_config.num_processes or None,
        process_id=None if mesh_config.process_id < 0 else mesh_config.process_id)


def _holders(tree) -> set[int]:
    """The processes that hold a shard of some array of `tree` (every process for host values)."""
    arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    if not arrays:
        return set(range(jax.process_count()))
    return {d.process_index for x in arrays for d in x.sharding.device_set}


def fetch(tree):
    """`tree`'s replicated arrays as numpy on every process: `jax.device_get` where every process
    holds them, else one broadcast from the first process that does — a disaggregated run across
    processes, where the learner's step and metrics live on processes the sampler's lacks (and
    the other way round). Every process must call it then."""
    owners = _holders(tree)
    if owners == set(range(jax.process_count())):
        return jax.device_get(tree)
    source = jax.process_index() == min(owners)
    local = jax.device_get(tree) if source else jax.tree.map(
        lambda x: np.zeros(np.shape(x), x.dtype if hasattr(x, "dtype") else np.float32), tree)
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(local, is_source=source))


def without_local_shards(shape, dtype, sharding: NamedSharding) -> jax.Array:
    """An array of `shape`, `dtype` and `sharding` on a process that holds none of its devices:
    what that process passes to the programs only the others compute."""
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, [], dtype=dtype)


def broadcast_json(value, source: int):
    """Process `source`'s JSON-able `value` on every process (its length, then its bytes; the
    others pass anything, e.g. None). Every process must call it; a no-op on one process."""
    if jax.process_count() == 1:
        return value
    is_source = jax.process_index() == source
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_source else None
    size = multihost_utils.broadcast_one_to_all(
        np.asarray(len(data) if is_source else 0, np.int32), is_source=is_source)
    data = multihost_utils.broadcast_one_to_all(
        data if is_source else np.zeros(int(size), np.uint8), is_source=is_source)
    return json.loads(np.asarray(data, np.uint8).tobytes().decode())


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (one all-gather; no-op on one process):
    decisions that change the collective program (stop here, checkpoint now) must agree."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


# ---------------------------------------------------------------- rollout / learner placement
# (issue 32) `mesh.rollout_devices = 0`: rollout and learning share every device (colocated).
# N > 0: N devices form the rollout mesh, the rest the learner mesh, each shaped by its own sizes
# (`mesh.rollout.{data,fsdp,tensor}`, `mesh.{data,fsdp,tensor}`) so the one rule table resolves to
# each mesh's own shardings (e.g. tensor-parallel sampling beside an FSDP learner). Which N
# (`mesh.rollout_placement`): "first" — the first N of the run's device list, which is
# process-major (`jax.devices()`), so with several processes N = a multiple of the devices per
# process gives whole processes to the sampler (process 0 samples, the others learn);
# "per_process" — the first N / P devices of each of the P processes, so both meshes span every
# process (each host samples on some of its chips and learns on the rest).
# `cfpo_jax.weight_sync` moves the weights from one to the other.

PLACEMENTS = ("first", "per_process")


def split_devices(devices, rollout_devices: int, placement: str = "first"):
    """(rollout devices, learner devices) of the run's `devices` (in order): both all of them
    when `rollout_devices` is 0, else per `placement` (see above)."""
    devices = list(devices)
    if rollout_devices == 0:
        return devices, devices
    if not 0 < rollout_devices < len(devices):
        raise ValueError(
            f"mesh.rollout_devices={rollout_devices}: must be 0 (colocated) or between 1 and "
            f"{len(devices) - 1} (the rest learn) with {len(devices)} devices")
    if placement == "first":
        return devices[:rollout_devices], devices[rollout_devices:]
    if placement != "per_process":
        raise ValueError(f"mesh.rollout_placement={placement!r}: one of {PLACEMENTS}")
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    count, sizes = len(by_process), {len(v) for v in by_process.values()}
    per = rollout_devices // count
    if rollout_devices % count or len(sizes) != 1 or not 0 < per < min(sizes):
        raise ValueError(
            f"mesh.rollout_devices={rollout_devices} with mesh.rollout_placement='per_process': "
            f"must be a multiple of the {count} processes leaving each some learner devices "
            f"(each has {sorted(sizes)} devices): N / {count} between 1 and {min(sizes) - 1}")
    rollout = [d for ds in by_process.values() for d in ds[:per]]
    return rollout, [d for ds in by_process.values() for d in ds[per:]]


def placement(mesh_config, devices=None) -> tuple[Mesh, Mesh]:
    """(rollout mesh, learner mesh) per `mesh_config` (`mesh.rollout_devices`,
    `mesh.rollout_placement`, the learner sizes `mesh.{data,fsdp,expert,tensor,dcn}` and the
    rollout sizes `mesh.rollout.{data,fsdp,tensor}`); one and the same mesh twice when colocated."""
    devices = jax.devices() if devices is None else devices
    rollout, learner = split_devices(devices, mesh_config.rollout_devices,
                                     mesh_config.rollout_placement)
    learner_mesh = make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor,
                             devices=learner, expert=mesh_config.expert, dcn=mesh_config.dcn)
    if mesh_config.rollout_devices == 0:
        return learner_mesh, learner_mesh
    sizes = mesh_config.rollout
    return make_mesh(sizes.data, sizes.fsdp, sizes.tensor, devices=rollout), learner_mesh
