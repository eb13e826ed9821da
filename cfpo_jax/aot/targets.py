"""Compile-only devices of real accelerators, and their memory per chip.

`devices("v5p-8")` gives the devices of a TPU v5p slice, `devices("h100x8")` eight H100s, on a
host without any of them: libtpu's topologies (`jax.experimental.topologies`) and the jax CUDA
plugin with a GPU target config (`h100_sxm.txtpb`, XLA's spec of the device). Programs lowered
with shardings over a mesh of these devices are compiled by the real chip compiler (XLA:TPU with
Mosaic, XLA:GPU with cuDNN and Triton) — as MaxText's train_compile does — but cannot run.
Needs `JAX_PLATFORMS=cpu` (no accelerator is initialised) and the `compile` extra
(pyproject.toml: libtpu, the CUDA plugin).

Names follow Cloud's: a TPU slice is named by its TensorCores (v5p-8, v4-8: 4 chips of 2 cores;
v5e-8, v6e-8: 8 chips of one core); H100s by their GPU count. Pods span hosts as the real ones
do — a v5p or v6e pod slice is hosts of 4 chips (2x2x1), an H100 cluster hosts of 8 GPUs — so the
compiled program is the multi-process one (each host addresses its own chips):
  v5p-16   2x2x2 =  8 chips,  2 hosts      v5p-32  2x2x4 = 16 chips,  4 hosts
  v5p-64   2x4x4 = 32 chips,  8 hosts      v6e-64    8x8 =  64 chips, 16 hosts
  v5p-128  4x4x4 = 64 chips, 16 hosts      v6e-256 16x16 = 256 chips, 64 hosts
  v5p-256  4x4x8 = 128 chips, 32 hosts     h100x16, h100x32, h100x64: 2, 4, 8 hosts × 8
  v5p-64x2 two v5p-64 slices (64 chips) joined by the data-centre network (DCN): a mesh over it
           takes `mesh.dcn = 2`, the `data` axis spanning the slices (`cfpo_jax.sharding.make_mesh`).

HBM per chip is the vendors' published capacity (Cloud TPU's system-architecture pages for
v4/v5e/v5p/v6e; an H100's as XLA's spec states it: 84,942,979,072 bytes): it sizes the memory
check. The peak FLOP/s and bandwidth of a roofline *bound* are looked up by device kind in the
one table of published chip figures, benchmarks/chips.py; they time nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "cuda" (the topology platform)
    topology: str  # libtpu topology name (one slice), or the CUDA plugin's "slices x hosts x GPUs per host"
    chips: int
    chip_bytes: int  # HBM per chip
    chip_config: str = "default"  # libtpu: "megacore" fuses a v4/v5p chip's two cores
    host_chips: tuple = ()  # TPU: the chips of one host (x, y, z); () = the whole slice on one host
    slices: int = 1  # TPU slices joined by DCN (each of `topology`)

    @property
    def hosts(self) -> int:
        if self.platform == "cuda":
            return int(self.topology.split("x")[1])
        return self.chips // (math.prod(self.host_chips) if self.host_chips else self.chips // self.slices)


def _tpu(name, topology, chips, gib, chip_config="default", host_chips=(), slices=1):
    return Target(name, "tpu", topology, chips, gib * GIB, chip_config, host_chips, slices)


def _h100(chips):
    # The CUDA plugin's topology: "slices x hosts per slice x GPUs per host".
    return Target(f"h100x{chips}", "cuda", f"1x{max(1, chips // 8)}x{min(chips, 8)}", chips, 84_942_979_072)


POD_HOST = (2, 2, 1)  # a v5p or v6e pod slice's host: 4 chips
TARGETS = {t.name: t for t in (
    _h100(8), _h100(1), _h100(2), _h100(16), _h100(32), _h100(64),
    _tpu("v5p-8", "v5p:2x2x1", 4, 95),
    _tpu("v4-8", "v4:2x2x1", 4, 32, chip_config="megacore"),
    _tpu("v5e-8", "v5e:2x4", 8, 16),
    _tpu("v5e-4", "v5e:2x2", 4, 16),
    _tpu("v6e-8", "v6e:2x4", 8, 32),
    _tpu("v5p-16", "v5p:2x2x2", 8, 95, host_chips=POD_HOST),
    _tpu("v5p-32", "v5p:2x2x4", 16, 95, host_chips=POD_HOST),
    _tpu("v5p-64", "v5p:2x4x4", 32, 95, host_chips=POD_HOST),
    _tpu("v5p-128", "v5p:4x4x4", 64, 95, host_chips=POD_HOST),
    _tpu("v5p-256", "v5p:4x4x8", 128, 95, host_chips=POD_HOST),
    _tpu("v5p-64x2", "v5p:2x4x4", 64, 95, host_chips=POD_HOST, slices=2),
    _tpu("v6e-64", "v6e:8x8", 64, 32, host_chips=POD_HOST),
    _tpu("v6e-256", "v6e:16x16", 256, 32, host_chips=POD_HOST),
)}
# XLA options per platform for compiling without the chips. XLA:GPU rewrites large sorts (a
# mixture of experts' dispatch argsorts its token-expert assignments: 262,144 per chip for
# Qwen3-30B-A3B's update) into CUB's radix sort, and sizes its scratch by calling CUDA, which a
# host without a GPU cannot load ("Error loading CUDA libraries"); its comparison sort compiles.
# A run on the GPUs keeps the CUB sort: the compiled program differs only in that sort.
COMPILER_OPTIONS = {"gpu": {"xla_gpu_enable_cub_radix_sort": False}}
# h100x2 and v5e-4 are the small meshes of the tests; the rest are what configs are run on.
TARGET_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "h100_sxm.txtpb")


def get(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[name]


@functools.lru_cache(maxsize=None)
def devices(name: str) -> tuple:
    """The compile-only devices of target `name` (one per chip)."""
    from jax.experimental import topologies

    target = get(name)
    if target.platform == "cuda":
        with open(TARGET_CONFIG) as f:
            topology = topologies.get_topology_desc(platform="cuda", target_config=f.read(),
                                                    topology=target.topology)
    else:
        # Compile-only: no chip is opened, so other processes (tests run in parallel, other
        # users of the host) may load libtpu at the same time; without this it takes a lock.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        bounds = tuple(int(d) for d in target.topology.split(":")[1].split("x"))
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
            chips_per_host_bounds=target.host_chips or (bounds + (1,) * 3)[:3],
            num_slices=target.slices)
    found = tuple(topology.devices)
    processes = len({d.process_index for d in found})
    if len(found) != target.chips or processes != target.hosts:
        raise RuntimeError(f"target {name}: expected {target.chips} compile-only devices on {target.hosts} "
                           f"hosts, got {len(found)} on {processes}")
    return found
