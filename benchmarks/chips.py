"""Published per-chip figures, keyed by `jax.Device.device_kind`: the denominators of MFU and of
the decode roofline when they are taken against the datasheet rather than against a peak measured
in the same run.

Only chips whose figures have a source are listed. `lookup` returns None for any other device
kind (a CPU, an unlisted GPU): a benchmark then reports the figure as missing, never a guess.
bf16 figures are dense matmul rates (NVIDIA's datasheets print them with 2:4 sparsity: half of
that is the dense rate). Bandwidth and capacity are in bytes (1e9 per GB, as the datasheets count).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # dense bf16 matmul FLOP/s
    hbm_bytes_per_s: float
    hbm_bytes: float
    source: str


_NVIDIA_H100 = ("NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), SXM column: "
                "BF16 Tensor Core 1,979 TFLOPS with sparsity, GPU memory 80 GB, 3.35 TB/s")
_NVIDIA_H200 = ("NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), H200 SXM column: "
                "BF16 Tensor Core 1,979 TFLOPS with sparsity, GPU memory 141 GB, 4.8 TB/s")

CHIPS = {
    # device_kind as jax reports it: the CUDA device name; libtpu's chip name (read from compile-only
    # topologies of jax 0.10.2's libtpu: v5e is "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite").
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM5 80GB", 989.5e12, 3.35e12, 80e9, _NVIDIA_H100),
    "NVIDIA H200": Chip("H200 SXM 141GB", 989.5e12, 4.8e12, 141e9, _NVIDIA_H200),
    "TPU v4": Chip("TPU v4", 275e12, 1200e9, 32 * 2**30,
                   "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16 per chip, HBM2 32 GiB, 1,200 GBps"),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 819e9, 16e9,
                        "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16 per chip, HBM2 16 GB, 819 GBps"),
    "TPU v5": Chip("TPU v5p", 459e12, 2765e9, 95e9,
                   "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16 per chip, HBM2e 95 GB, 2,765 GBps"),
    "TPU v6 lite": Chip("TPU v6e", 918e12, 1638e9, 32e9,
                        "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16 per chip, HBM 32 GB, 1,638 GBps"),
}
# The names some libtpu versions report for the same chips (jax's own tables accept both).
CHIPS.update({"TPU v5e": CHIPS["TPU v5 lite"], "TPU v5p": CHIPS["TPU v5"], "TPU v6e": CHIPS["TPU v6 lite"]})


def lookup(device_kind: str) -> Chip | None:
    """The published figures of `device_kind`, or None when the table has no such chip."""
    return CHIPS.get(device_kind)
