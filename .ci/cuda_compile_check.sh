#!/usr/bin/env bash
# Compile-checks the CUDA kernels without a GPU: builds the CUDA wheel of
# kvcomm for one arch (default 9.0a, the arch the GPU session builds for on
# the H100/H200) with .ci/cuda_wheel.sh, out of tree in a temporary directory
# (the in-place CPU build is never touched), which checks an object exists for
# every .cu and times each, prints every kernel's registers, stack, spills and
# local memory and fails on a spill (.ci/resource_check.py), fails if a KV load
# or store of a vector kernel is not one 128-bit global instruction
# (.ci/sass_check.py), and installs the wheel into a fresh venv with its torch,
# where it must import and register a CUDA kernel for every kvcomm op. A
# negative control then builds the plain kernels with the plain C++ vector
# load/store they used to have (-DKVCOMM_PLAIN_CXX_VECTOR_ACCESS) and
# requires the SASS check to reject them, so the check is known to be able
# to fail. Exits non-zero on any failure.
#
#   bash .ci/cuda_compile_check.sh [VENV]
#
# VENV: a virtual environment with the CUDA torch (.ci/cuda_env.sh creates it
# if missing). Default: $KVCOMM_CUDA_VENV, else build/venv-cuda (ignored by git).
#
# KVCOMM_CUDA_TORCH: the torch release to build against (default 2.14.1,
# which pip takes from this machine's disk; CI uses that).
# .ci/cuda_device_combo_check.sh runs this script with the lent GPU
# machine's combination (Python 3.12, torch 2.11.0 with CUDA 13.0, which
# compiles the C++ as C++17) on demand.
#
# Settings, each overridable from the environment: CUDA_HOME (where nvcc is,
# default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS
# (default 2). KVCOMM_SRC builds another source tree than this checkout.
# All archs users run: .ci/cuda_wheel.sh (docs/cuda-wheel.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-${KVCOMM_CUDA_VENV:-$ROOT/build/venv-cuda}}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
say() { echo "[cuda-check $(( $(date +%s) - start ))s] $*"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvcomm-cuda-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
status=0
KVCOMM_CUDA_WORK=$WORK/build WHEEL_DIR=$WORK/dist bash "$ROOT/.ci/cuda_wheel.sh" "$VENV" || status=1
[ -d "$WORK/build/src" ] || exit 1  # nothing was built to control

# The same environment (already set up: this only reads it).
. "$ROOT/.ci/cuda_env.sh" >/dev/null
SRC=$WORK/build/src

# Negative control: the plain kernels with the plain C++ vector access must
# fail the SASS check (split 32-bit stores, generic loads). The compact
# kernels store through the same store_float, so the plain ones suffice.
ARCH=${TORCH_CUDA_ARCH_LIST%%[ ;]*}
ARCH=${ARCH%+PTX}
ARCH="sm_${ARCH//./}"
# The C++ standard torch's headers need (C++20 from 2.13 on) and their include paths.
read -r STD TORCH_INC < <("$PY" -c '
import torch, torch.utils.cpp_extension as c
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print(20 if v >= (2, 13) else 17, " ".join("-I" + p for p in c.include_paths()))' 2>/dev/null)
say "negative control: cuda/launch_plain.cu with -DKVCOMM_PLAIN_CXX_VECTOR_ACCESS ($ARCH, C++$STD)"
# shellcheck disable=SC2086
if ! "$CUDA_HOME/bin/nvcc" -std=c++$STD -O3 -arch="$ARCH" -cubin $TORCH_INC -I"$SRC/cpp" -I"$SRC/cpp/include" \
     -I"$SRC/cuda" -DKVCOMM_PLAIN_CXX_VECTOR_ACCESS "$SRC/cuda/launch_plain.cu" -o "$WORK/control.cubin" \
     > "$WORK/control.log" 2>&1; then
  tail -20 "$WORK/control.log" >&2
  echo "cuda_compile_check: the negative control did not compile" >&2
  status=1
elif "$PY" "$ROOT/.ci/sass_check.py" "$WORK/control.cubin" --cuobjdump "$CUOBJDUMP" --kernels offset --codes plain \
     > "$WORK/control.out" 2>&1; then
  cat "$WORK/control.out" >&2
  echo "cuda_compile_check: the SASS check PASSED the plain C++ vector access; it would not catch a regression" >&2
  status=1
elif ! grep -q "KV store narrower than 128 bits" "$WORK/control.out"; then
  cat "$WORK/control.out" >&2
  echo "cuda_compile_check: the negative control failed for another reason than split stores" >&2
  status=1
else
  say "negative control rejected as it should: $(grep -c "KV store narrower" "$WORK/control.out") split-store and $(grep -c "generic memory access" "$WORK/control.out") generic-access findings (of the first 60 listed)"
fi

[ "$status" -eq 0 ] && say "OK" || say "FAILED"
exit "$status"
