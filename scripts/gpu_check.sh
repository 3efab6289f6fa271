#!/usr/bin/env bash
# Checks that this repository trains correctly on this machine's NVIDIA GPUs, within eight minutes
# (scripts/gpu_check.py says what each check does): first the machine's line (Python, torch,
# CUDA, driver, GPUs, Triton, timm), then flex against the explicit attention path (one layer
# in fp32 and bf16, and three training steps of a compiled model), the DeiT-S MultiMax preset as
# users train it (compiled, bf16, EMA), 2-process DDP parity, a forced fp16 overflow, the
# benchmark's DeiT-S and DeiT-B train steps and the CUDA tests; one summary table, PASS / FAIL /
# SKIP per line, in runs/gpu_check/summary.md.
#
#   scripts/gpu_check.sh                               # everything; logs and tables in runs/gpu_check/
#   scripts/gpu_check.sh --only flex-fp32 flex-train --out /tmp/check
#
# Exit code 0: no check failed; 1: a check failed; 2: the machine cannot run the checks (a GPU
# torch cannot use, no GPU, a missing package, no compiler), said in one line.
# Python: $PYTHON if set, else the repository's .venv (make setup), else python3. Without internet,
# wheels of missing packages in $WHEEL_DIR (default .whl/) are installed first, into a folder of
# their own put on PYTHONPATH for this run ($GPU_CHECK_SITE, default /tmp/gpu_check_site-$UID).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEEL_DIR="${WHEEL_DIR:-.whl}"
if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
  SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site-$(id -u)}"
  echo "gpu_check: installing the wheels in $WHEEL_DIR into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEEL_DIR"/*.whl \
    || { echo "gpu_check: pip could not install the wheels in $WHEEL_DIR (see above)" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
