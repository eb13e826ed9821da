#!/usr/bin/env bash
# One GPU node (all local GPUs form the mesh: fsdp over every device).
#   launch/gpu.sh --config=configs/math_qwen.py:1.5b --workdir=runs/math_qwen_1.5b [--config.x=y ...]
# Install once: pip install -e '.[gpu,hf]'
# Preemption: SIGTERM (e.g. from SLURM or a spot VM) checkpoints and exits 0; run the same command
# again to resume from the latest complete checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
# Leave headroom for the sampler's KV cache next to XLA's own pool.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python -m cfpo_jax.train "$@"
