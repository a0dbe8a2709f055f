#!/usr/bin/env bash
# Set up a working checkout from scratch: a venv in .venv with the pinned dependencies, and the
# package built from source (the C++ op schemas always; the CUDA kernels when nvcc is found).
# Idempotent: rerunning only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# --no-build-isolation: build against the torch installed above (a build env would fetch another).
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -m resnet_kernels info
