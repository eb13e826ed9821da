"""The learner's weights onto the rollout mesh, device to device (`mesh.rollout_devices`).

The two meshes come from `sharding.placement` (`mesh.rollout_devices`: 0 colocated, N > 0 the
first N devices sample and the rest learn, each mesh with its own sizes and so its own shardings
from the one rule table).

The move (`WeightSync`), chosen once from the two meshes:

* **same devices** (colocated): a jitted copy into the rollout shardings. A copy even when the
  shardings are equal, because the learner donates its parameters to the next update while an
  asynchronous rollout may still be sampling from the older version.
* **disjoint devices, one process** (every device addressable): `jax.device_put` into the
  rollout shardings — XLA copies device to device, any mesh sizes.
* **disjoint devices, several processes**: `jax.device_put` between meshes whose devices belong
  to different processes fails on backends without cross-host transfers (jax 0.10 on CPU and GPU:
  "does not support cross-host device transfers"; the TFRT TPU runtime alone has it, and only for
  identical layouts) — the failure JAX users report. Instead one SPMD program runs over the union
  of the two meshes, the learner mesh stacked on a copy of itself made of the rollout devices
  (axis "side", as Pathways-free MaxText/Tunix setups do with a collective over both meshes): each
  parameter is viewed, without a copy, as a [2·d0, ...] array whose first half lives on the
  learner devices and second half on the rollout devices in the same layout, and a `ppermute`
  along "side" sends every learner shard to its rollout peer over the collective fabric (ICI/DCN,
  NCCL, or gloo on CPU). The rollout side then holds the weights in the learner's layout over the
  rollout devices ("transfer layout"), and a jitted reshard on the rollout devices alone takes
  them to the rollout shardings when those differ. Every process runs the program (SPMD); a
  process without rollout devices gets arrays with no addressable shard. It needs as many rollout
  as learner devices (the usual halves of a pod); other splits across processes are refused with
  the counts. Costs: the learner side receives a transient params-sized buffer of zeros (the
  program's output there, freed at once); the rollout side keeps the last transfer-layout result
  as the next call's send buffer (no copy when the two layouts are the same).

`WeightSync.seconds` holds the last move's wall time, from the weights being ready on the
learner devices (the update that made them is not counted) to their being ready on the rollout
devices: the `weight_sync_s` metric.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


SIDE = "side"  # the union mesh's axis: 0 = learner devices, 1 = rollout devices


def _union_spec(spec: P, ndim: int) -> P:
    """`spec` with the first dimension also split over SIDE (outermost)."""
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    first = spec[0]
    inner = () if first is None else (first,) if isinstance(first, str) else tuple(first)
    return P((SIDE, *inner), *spec[1:])


def union_meshes(source_mesh: Mesh, target_mesh: Mesh) -> tuple[Mesh, Mesh]:
    """(union mesh, transfer mesh) of two disjoint meshes with as many devices: the target's
    devices arranged like the source mesh (the transfer layout), and both stacked on SIDE."""
    if source_mesh.devices.size != target_mesh.devices.size:
        raise ValueError(
            f"moving weights between processes needs as many rollout devices as learner "
            f"devices; got {target_mesh.devices.size} rollout and "
            f"{source_mesh.devices.size} learner devices (mesh.rollout_devices)")
    transfer = Mesh(np.asarray(target_mesh.devices).reshape(source_mesh.devices.shape),
                    source_mesh.axis_names)
    union = Mesh(np.stack([source_mesh.devices, transfer.devices]),
                 (SIDE, *source_mesh.axis_names))
    return union, transfer


def union_sharding(union_mesh: Mesh, spec: P, ndim: int) -> NamedSharding:
    """The sharding of a [2·d0, ...] union array whose halves have `spec` on each side."""
    return NamedSharding(union_mesh, _union_spec(spec, ndim))


def send_program(union_mesh: Mesh, specs):
    """The jitted union program: every leaf's source half sent to the target side (`ppermute`
    along SIDE); `specs` the leaves' union PartitionSpecs. `cfpo_jax.aot` compiles it too."""
    send = jax.shard_map(lambda *blocks: [jax.lax.ppermute(b, SIDE, [(0, 1)]) for b in blocks],
                         mesh=union_mesh, in_specs=tuple(specs), out_specs=list(specs))
    return jax.jit(send)


class WeightSync:
    """`sync(params) -> params in target_shardings` for params NamedSharding-ed on `source_mesh`:
    the learner's weights to the rollout mesh (source = learner, target = rollout), or a rollout
    batch back the other way.

    `target_shardings`: a pytree of NamedShardings on `target_mesh` with the params' structure
    (e.g. `sharding.param_shardings(target_mesh, params)`), or one NamedSharding for every leaf
    (a rollout batch, whose shapes may change from call to call). `method` forces the union
    program ("union") on disjoint meshes of one process (tests, benchmarks); default: chosen."""

    def __init__(self, source_mesh: Mesh, target_mesh: Mesh, target_shardings, *,
                 method: str | None = None):
        self.source_mesh, self.target_mesh = source_mesh, target_mesh
        self.target_shardings = target_shardings
        self.seconds = 0.0
        if method not in (None, "union"):
            raise ValueError(f"method={method!r}: None (chosen from the meshes) or 'union'")
        source_set, target_set = set(source_mesh.devices.flat), set(target_mesh.devices.flat)
        if source_set == target_set:
            self.method = "copy"
            self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree),
                                 out_shardings=target_shardings)
        elif source_set & target_set:
            raise ValueError("the rollout and learner meshes share some devices but not all: "
                             "they must be the same devices (colocated) or disjoint")
        elif method != "union" and all(d.process_index == jax.process_index()
                                       for d in source_set | target_set):
            self.method = "device_put"
        else:
            self.method = "union"
            self.union_mesh, self.transfer_mesh = union_meshes(source_mesh, target_mesh)
            self._send = None  # the rollout side's buffers of the last transfer (transfer layout)
            self._programs = {}

    def __call__(self, params):
        jax.block_until_ready(params)  # the update that made them is not the move's time
        t0 = time.perf_counter()
        if self.method == "copy":
            out = self._copy(params)
        elif self.method == "device_put":
            out = jax.device_put(params, self.target_shardings)
        else:
            out = self._union(params)
        jax.block_until_ready(out)
        self.seconds = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ across processes

    def _union(self, params):
        leaves, treedef = jax.tree.flatten(params)
        if not leaves:  # e.g. the frozen state of a policy without adapters
            return params
        if self._send is None or [(b.shape, b.dtype) for b in self._send] != [
                (x.shape, x.dtype) for x in leaves]:
            self._send = [self._zeros(x) for x in leaves]
        stacked = [self._stack(x, buffer) for x, buffer in zip(leaves, self._send)]
        key = tuple((x.shape, x.dtype, x.sharding.spec) for x in leaves)
        if key not in self._programs:
            self._programs[key] = send_program(self.union_mesh, [s.sharding.spec for s in stacked])
        # Each program with its own mesh in context, whatever mesh the caller has in context.
        with jax.set_mesh(self.union_mesh):
            received = self._programs[key](*stacked)
        transfer = [self._rollout_half(r, x) for r, x in zip(received, leaves)]
        self._send = transfer
        targets = jax.tree.leaves(self.target_shardings) if not isinstance(
            self.target_shardings, NamedSharding) else [self.target_shardings] * len(transfer)
        # A reshard on the rollout devices alone, where the rollout rules differ; else the same
        # buffers under the target sharding (its mesh is what later programs are traced with).
        with jax.set_mesh(self.target_mesh):
            out = [t if t.sharding == s else jax.device_put(t, s)
                   for t, s in zip(transfer, targets)]
        return jax.tree.unflatten(treedef, out)

    def _transfer_sharding(self, x) -> NamedSharding:
        return NamedSharding(self.transfer_mesh, x.sharding.spec)

    def _zeros(self, x):
        with jax.set_mesh(self.transfer_mesh):
            return jax.jit(lambda: jnp.zeros(x.shape, x.dtype),
                           out_shardings=self._transfer_sharding(x))()

    def _stack(self, x, buffer):
        """`x` (learner devices) and `buffer` (rollout devices, same layout) as one [2·d0, ...]
        array on the union mesh: the existing shards, no copy."""
        if x.ndim == 0:
            raise ValueError("a scalar parameter cannot be split over the union mesh")
        if not isinstance(x.sharding, NamedSharding) or x.sharding.mesh.devices.shape != \
                self.source_mesh.devices.shape:
            raise ValueError(f"parameters must be NamedSharding-ed on the learner mesh; got "
                             f"{x.sharding}")
        union = union_sharding(self.union_mesh, x.sharding.spec, x.ndim)
        shape = (2 * x.shape[0], *x.shape[1:])
        shards = {s.device: s.data for s in x.addressable_shards}
        shards.update({s.device: s.data for s in buffer.addressable_shards})
        return jax.make_array_from_single_device_arrays(
            shape, union, [shards[d] for d in union.addressable_devices_indices_map(shape)],
            dtype=x.dtype)

    def _rollout_half(self, received, x):
        """The rollout devices' half of the union program's output: `x`'s value, in the
        transfer layout."""
        target = self._transfer_sharding(x)
        shards = {s.device: s.data for s in received.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            x.shape, target, [shards[d] for d in target.addressable_devices_indices_map(x.shape)],
            dtype=x.dtype)
