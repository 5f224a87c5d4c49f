#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu_check.py says what it runs); prepare first with scripts/gpu_prepare.sh.
#   on the GPU machine (device run, carry [".gpu"]):  bash scripts/gpu_check.sh --out "$OUT"
#   here, the CPU rehearsal:                          bash scripts/gpu_check.sh --cpu --out /tmp/gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# the driver keeps its own deadline; this outer limit only catches a hang in the driver itself
exec timeout --kill-after=15 580 "$PY" -m scripts.gpu_check --python "$PY" "$@"
