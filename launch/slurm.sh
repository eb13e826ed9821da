#!/usr/bin/env bash
# Several GPU nodes under SLURM: one process per node, jax.distributed.initialize() reads SLURM's
# environment (--config.mesh.distributed=True).
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh --config=configs/math_qwen.py:7b \
#       --workdir=/shared/runs/math_qwen_7b
# The workdir must be on a file system every node sees (checkpoints are written by all hosts).
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
srun python -m cfpo_jax.train --config.mesh.distributed=True "$@"
