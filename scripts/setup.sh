#!/usr/bin/env bash
# Set up a working checkout from scratch: a venv in .venv with the pinned dependencies, and the
# package built from source (the C++ op schemas always; the CUDA kernels when nvcc is found).
# Idempotent: a rerun installs nothing new and rebuilds the extension only when a source changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# --no-build-isolation: build against the torch installed above (a build env would fetch another).
# Skipped when the built extension is newer than every source and build file and imports (a CUDA
# build takes minutes on 2 cores); RESNET_KERNELS_REBUILD=1 forces it (e.g. after changing a build
# switch such as RESNET_KERNELS_CUDA_ARCHS).
so=$(ls resnet_kernels/_C*.so 2>/dev/null | head -n 1 || true)
if [ "${RESNET_KERNELS_REBUILD:-0}" != "1" ] && [ -n "$so" ] \
    && [ -z "$(find csrc setup.py pyproject.toml MANIFEST.in requirements.txt -newer "$so" -type f 2>/dev/null | head -n 1)" ] \
    && .venv/bin/python -m pip show -q resnet_kernels >/dev/null 2>&1 \
    && .venv/bin/python -c "import resnet_kernels._C" >/dev/null 2>&1; then
  echo "resnet_kernels: extension $so is up to date (RESNET_KERNELS_REBUILD=1 rebuilds)"
else
  .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
fi
.venv/bin/python -m resnet_kernels info
