"""Compile-only devices of real accelerators, and their memory per chip.

`devices("v5p-8")` gives the devices of a TPU v5p slice, `devices("h100x8")` eight H100s, on a
host without any of them: libtpu's topologies (`jax.experimental.topologies`) and the jax CUDA
plugin with a GPU target config (`h100_sxm.txtpb`, XLA's spec of the device). Programs lowered
with shardings over a mesh of these devices are compiled by the real chip compiler (XLA:TPU with
Mosaic, XLA:GPU with cuDNN and Triton) — as MaxText's train_compile does — but cannot run.
Needs `JAX_PLATFORMS=cpu` (no accelerator is initialised) and the `compile` extra
(pyproject.toml: libtpu, the CUDA plugin).

Names follow Cloud's: a TPU slice is named by its TensorCores (v5p-8, v4-8: 4 chips of 2 cores;
v5e-8, v6e-8: 8 chips of one core); an H100 host by its GPU count.

HBM per chip is the vendors' published capacity (Cloud TPU's system-architecture pages for
v4/v5e/v5p/v6e; an H100's as XLA's spec states it: 84,942,979,072 bytes): it sizes the memory
check. The peak FLOP/s and bandwidth of a roofline *bound* are looked up by device kind in the
one table of published chip figures, benchmarks/chips.py; they time nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "cuda" (the topology platform)
    topology: str  # libtpu topology name, or the CUDA plugin's "hosts x slices x devices"
    chips: int
    chip_bytes: int  # HBM per chip
    chip_config: str = "default"  # libtpu: "megacore" fuses a v4/v5p chip's two cores


def _tpu(name, topology, chips, gib, chip_config="default"):
    return Target(name, "tpu", topology, chips, gib * GIB, chip_config)


def _h100(chips):
    return Target(f"h100x{chips}", "cuda", f"1x1x{chips}", chips, 84_942_979_072)


TARGETS = {t.name: t for t in (
    _h100(8), _h100(1), _h100(2),
    _tpu("v5p-8", "v5p:2x2x1", 4, 95),
    _tpu("v4-8", "v4:2x2x1", 4, 32, chip_config="megacore"),
    _tpu("v5e-8", "v5e:2x4", 8, 16),
    _tpu("v5e-4", "v5e:2x2", 4, 16),
    _tpu("v6e-8", "v6e:2x4", 8, 32),
)}
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
            chips_per_host_bounds=(bounds + (1,) * 3)[:3], num_slices=1)
    found = tuple(topology.devices)
    if len(found) != target.chips:
        raise RuntimeError(f"target {name}: expected {target.chips} compile-only devices, got {len(found)}")
    return found
