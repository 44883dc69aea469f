#!/usr/bin/env bash
# On demand (not part of .ci/run): the CUDA compile check of
# .ci/cuda_compile_check.sh (the 9.0a wheel built, its resource table with no
# spills, the SASS check of the vector kernels and its negative control, the
# wheel installed into a fresh venv with its torch, a CUDA kernel for every
# op) against the combination of the lent GPU machine: Python 3.12, torch
# 2.11.0 (CUDA 13.0; its headers build the C++ as C++17, where 2.13+ use
# C++20), nvcc 13.0, arch 9.0a.
#
#   bash .ci/cuda_device_combo_check.sh [VENV]      # default build/venv-cuda-211
#
# The first run creates VENV with Python 3.12 (pyenv's, or python3.12 on
# PATH) and pip downloads torch 2.11.0 with its CUDA libraries from PyPI
# (~4.7 GB installed; about 7 minutes here), then the build takes as long
# as the regular check, and the fresh venv of the wheel check installs that
# torch again (from pip's cache). That is too slow for every CI run, which
# checks torch 2.14.1 (local disk) and the same arch. Exits non-zero on any
# failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY312=$(command -v python3.12 || true)
if [ -z "$PY312" ]; then
  PY312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1 || true)
fi
if [ -z "$PY312" ]; then
  echo "cuda_device_combo_check: no Python 3.12 (python3.12 on PATH or pyenv's); the device machine has 3.12" >&2
  exit 1
fi
VENV=${1:-$ROOT/build/venv-cuda-211}
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "cuda_device_combo_check: $VENV is not a Python 3.12 environment; remove it or name another" >&2
  exit 1
fi
export KVCOMM_CUDA_PYTHON=$PY312 KVCOMM_CUDA_TORCH=${KVCOMM_CUDA_TORCH:-2.11.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
exec bash "$ROOT/.ci/cuda_compile_check.sh" "$VENV"
