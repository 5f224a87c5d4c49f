#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for scripts/gpu_check.sh and print the 64 MiB upload arithmetic; run it again right
# before a lease, since the working tree's size changes (scripts/gpu_prepare.py says what it downloads and why).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m scripts.gpu_prepare "$@"
