"""Ahead-of-time compilation of the run's programs for accelerators this host does not have:
`targets` (compile-only devices of TPU slices and H100 hosts), `programs` (the trainer's and
sampler's own jitted programs with abstract inputs), `report` (what the compiled program holds:
fused kernels, per-chip memory, FLOPs). Used by benchmarks/compile.py and tests/unit/aot/test_compile.py."""
