#!/usr/bin/env bash
# A Cloud TPU VM or pod slice: copies this checkout to every worker, installs it, and runs the same
# command on all hosts (multi-host needs --config.mesh.distributed=True; a single-host v4-8 /
# v5e-8 does not).
#   launch/tpu_vm.sh TPU_NAME ZONE "--config=configs/math_qwen.py:7b --config.mesh.distributed=True \
#       --workdir=gs://BUCKET/runs/math_qwen_7b"
# Use a gs:// workdir on a pod so that every host writes its checkpoint shards to one place.
# The coordinator is found by jax itself on a pod (the TPU metadata server names worker 0 and the
# slice's hosts), so mesh.coordinator_address / num_processes / process_id stay empty here.
# Preemption: Cloud TPU sends SIGTERM (to some or all hosts); the hosts agree to stop after the
# current step, checkpoint together and exit; rerun to resume.
set -euo pipefail
TPU_NAME="$1"; ZONE="$2"; ARGS="$3"
cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" . "$TPU_NAME":~/cfpo_jax
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" --command="
  cd ~/cfpo_jax && pip install -q -e '.[tpu,hf]' &&
  nohup python -m cfpo_jax.train $ARGS > train.log 2>&1 &"
echo "started; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/cfpo_jax/train.log'"
