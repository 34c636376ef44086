#!/usr/bin/env bash
# Run a suite, installing what is missing first:  scripts/run.sh suite=smoke [scale=tiny] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python run_suite.py "$@"
