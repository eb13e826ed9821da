#!/usr/bin/env bash
# Several GPU nodes under SLURM: one process per node, jax.distributed.initialize() reads SLURM's
# environment (--config.mesh.distributed=True): the coordinator is the first node of
# SLURM_JOB_NODELIST (port derived from the job id), num_processes SLURM_NTASKS, process_id
# SLURM_PROCID. Outside SLURM, or to pin the port, pass them yourself on every process:
#   --config.mesh.coordinator_address=HOST0:PORT --config.mesh.num_processes=N \
#   --config.mesh.process_id=I     (I = 0..N-1; HOST0 the machine of process 0)
# SIGTERM to any process (SLURM's --signal below) stops all of them at the same step: they agree
# after every step, checkpoint together and exit 0; resubmit to resume.
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh --config=configs/math_qwen.py:7b \
#       --workdir=/shared/runs/math_qwen_7b
# The workdir must be on a file system every node sees (checkpoints are written by all hosts).
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
srun python -m cfpo_jax.train --config.mesh.distributed=True "$@"
