#!/usr/bin/env bash
# One node, N GPUs, torchrun (DDP, NCCL).
#   scripts/train_imagenet.sh CONFIG NGPUS [key=value ...]
#   scripts/train_imagenet.sh configs/deit_small_multimax.yaml 8 data.root=/data/imagenet
# The presets assume 8 GPUs x data.batch_size=128 (global 1024, lr 5e-4 x 1024/512 = 1e-3).
# Ctrl-C or SIGTERM: every worker stops within a step or two, rank 0 saves a resumable
# checkpoint, each worker exits 75 (docs/STOPPING.md); torchrun itself
# then exits 1. Rerun the same command to resume. torchrun SIGKILLs its workers a while after
# passing a signal on: 30 s by default, 120 s here (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, read by the
# torch versions that have torchrun's --shutdown-timeout; older ones keep 30 s), so that a
# DeiT-B checkpoint on a slow disk is whole before then.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG NGPUS [key=value ...]" >&2
  exit 2
fi
CONFIG=$1; NGPUS=$2; shift 2
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" \
  train.py --config "$CONFIG" "$@"
