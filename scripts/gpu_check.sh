#!/usr/bin/env bash
# Checks that this repository trains correctly on this machine's NVIDIA GPUs, in about five
# minutes: the CUDA tests, flex against the explicit attention path (fp32, bf16), DeiT-S train
# steps in bf16 and in fp16 with a forced overflow, 2-process NCCL DDP parity (2 GPUs), and the
# benchmark's DeiT preset; one summary table, PASS / FAIL / SKIP per line (scripts/gpu_check.py).
#
#   scripts/gpu_check.sh                        # everything; logs and tables in runs/gpu_check/
#   scripts/gpu_check.sh --only flex-fp32 flex-bf16 --out /tmp/check
#
# Exit code 1 if a check failed. Without a GPU it says so and exits 0.
# Python: $PYTHON if set, else the repository's .venv (make setup), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
