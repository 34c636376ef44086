#!/usr/bin/env bash
# Run the tests, installing what is missing first. Extra arguments go to pytest
# (the default deselects tests marked slow; `scripts/test.sh -m ""` runs everything).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest -q "$@"
