#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/gpu_check.py), sized for 8 minutes on one H100-class GPU (not yet timed); writes
# results/gpu_check.md naming the GPU. It fails (exit 1, one line) when any part cannot run, never skips one.
#   bash benchmarks/gpu_check.sh            # in a checkout set up with scripts/setup.sh (the cuda extra installed)
#   PYTHON=python3 bash benchmarks/gpu_check.sh   # any interpreter that has the project's packages
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
command -v nvidia-smi >/dev/null || { echo "gpu_check: FAILED: no nvidia-smi: run this on a GPU machine" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec timeout 900 "$PY" -u benchmarks/gpu_check.py "$@"
