#!/usr/bin/env bash
# Compile-checks the CUDA kernels without a GPU: builds kvcomm._C with every
# cuda/*.cu against the CUDA build of torch (torch==2.14.1, CUDA 13.0), out of
# tree in a temporary directory (the in-place CPU build is never touched), then
# checks an object exists for every .cu, the library exists and loads, it
# registers a CUDA kernel for every kvcomm op, and its machine code does what
# the vector kernels are written to do: .ci/sass_check.py reads the SASS
# (cuobjdump --dump-sass) and fails if a KV load or store of a vector kernel
# is not one 128-bit global instruction. A negative control then builds the
# offset kernels with the plain C++ vector load/store they used to have
# (-DKVCOMM_PLAIN_CXX_VECTOR_ACCESS) and requires the SASS check to reject
# them, so the check is known to be able to fail. Exits non-zero on any failure.
#
#   bash .ci/cuda_compile_check.sh [VENV]
#
# VENV: a virtual environment with the CUDA torch. Created if missing (with
# $KVCOMM_CUDA_PYTHON, default python3), and torch==$KVCOMM_CUDA_TORCH ninja
# pybind11 setuptools wheel numpy installed into it when it lacks them.
# Default: $KVCOMM_CUDA_VENV, else build/venv-cuda (ignored by git).
#
# KVCOMM_CUDA_TORCH: the torch release to build against (default 2.14.1,
# which pip takes from this machine's disk; CI uses that).
# .ci/cuda_device_combo_check.sh runs this script with the lent GPU
# machine's combination (Python 3.12, torch 2.11.0 with CUDA 13.0, which
# compiles the C++ as C++17) on demand.
#
# Settings, each overridable from the environment: CUDA_HOME (where nvcc is,
# default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0a, the arch the
# GPU session builds for on the H100/H200), KVCOMM_CUDA=1 (forces the CUDA
# sources in although this machine has no GPU), MAX_JOBS (default 2).
# KVCOMM_SRC builds another source tree than this checkout. cuobjdump comes
# from $CUDA_HOME/bin when the toolkit has it, otherwise from the PyPI
# packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, installed into VENV.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${KVCOMM_SRC:-$ROOT}
VENV=${1:-${KVCOMM_CUDA_VENV:-$ROOT/build/venv-cuda}}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac   # the build runs in another directory
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export KVCOMM_CUDA=1
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_RELEASE=${KVCOMM_CUDA_TORCH:-2.14.1}
CUOBJDUMP_RELEASE=${KVCOMM_CUOBJDUMP_RELEASE:-13.2.51}   # any 13.x reads sm_90 code; this one is tested
start=$(date +%s)
say() { echo "[cuda-check $(( $(date +%s) - start ))s] $*"; }

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_compile_check: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi
say "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "${KVCOMM_CUDA_PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" - "$TORCH_RELEASE" <<'EOF' 2>/dev/null
import sys, torch, ninja, pybind11, setuptools, wheel, numpy  # noqa: F401
sys.exit(0 if torch.__version__.startswith(sys.argv[1]) and torch.version.cuda else 1)
EOF
then
  say "installing torch==$TORCH_RELEASE (CUDA build) and the build tools into $VENV"
  # (The grep drops pip's notes about this machine's empty local index dirs.)
  "$PY" -m pip install -q "torch==$TORCH_RELEASE" ninja pybind11 setuptools wheel numpy 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "cuda_compile_check: pip install failed" >&2; exit 1; }
fi
say "torch $("$PY" -c 'import sys, torch; print(torch.__version__, "CUDA", torch.version.cuda, "Python", sys.version.split()[0])')"

# The CUDA torch wheels carry the CUDA library headers (cuBLAS, cuSPARSE, ...)
# that torch's own headers include; the toolkit at CUDA_HOME may not.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
NV_INC=$(find "$SITE/nvidia" -maxdepth 3 -type d -name include 2>/dev/null | sort | paste -sd: -)
export CPATH="${NV_INC}${CPATH:+:$CPATH}"
export PATH="$VENV/bin:$PATH"  # ninja

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvcomm-cuda-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/src"
# The files a fresh clone has (tracked + untracked, not ignored); no built .so.
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$SRC" && git ls-files -co --exclude-standard -z \
     | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"
else
  cp -r "$SRC"/setup.py "$SRC"/pyproject.toml "$SRC"/README.md "$SRC"/cpp "$SRC"/cuda "$SRC"/python "$WORK/src/"
fi
find "$WORK/src" -name '_C*.so' -delete

say "building kvcomm._C with CUDA (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
(cd "$WORK/src" && "$PY" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp") \
  > "$WORK/build.log" 2>&1 || {
    # The compiler's errors first (the tail is Python's traceback), then the tail.
    grep -E "FAILED: |error:|#error" "$WORK/build.log" | head -40 >&2 || true
    tail -15 "$WORK/build.log" >&2
    echo "cuda_compile_check: build FAILED" >&2
    exit 1
  }
grep -E "warning" "$WORK/build.log" | grep -v "^ninja" | head -20 || true

status=0
for cu in "$WORK"/src/cuda/*.cu; do
  stem=$(basename "$cu" .cu)
  if [ -z "$(find "$WORK/tmp" -path "*/cuda/$stem.o" -print -quit)" ]; then
    echo "cuda_compile_check: no object for cuda/$stem.cu" >&2
    status=1
  fi
done
SO=$(find "$WORK/lib" -name '_C*.so' -print -quit)
if [ -z "$SO" ]; then
  echo "cuda_compile_check: the extension library was not built" >&2
  exit 1
fi
say "built $(basename "$SO") ($(du -h "$SO" | cut -f1)), $(ls "$WORK"/src/cuda/*.cu | wc -l) .cu files"

# Load it (an undefined symbol fails here, not at link time) and check the
# dispatcher has a CUDA kernel for every kvcomm op.
"$PY" - "$SO" <<'EOF' || status=1
import sys, torch
torch.ops.load_library(sys.argv[1])
names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kvcomm::"))
assert len(names) >= 8, f"too few kvcomm ops registered: {names}"
missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"CUDA kernels registered for all {len(names)} ops: {', '.join(n.split('::')[1] for n in names)}")
EOF

# The machine code of the vector kernels (.ci/sass_check.py).
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ ! -x "$CUOBJDUMP" ]; then
  CUOBJDUMP=$(find "$SITE/nvidia" -path "*/bin/cuobjdump" 2>/dev/null | head -1)
  if [ -z "$CUOBJDUMP" ] || [ -z "$(find "$SITE/nvidia" -path "*/bin/nvdisasm" 2>/dev/null | head -1)" ]; then
    say "no cuobjdump in $CUDA_HOME/bin: installing nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm into $VENV"
    "$PY" -m pip install -q "nvidia-cuda-cuobjdump==$CUOBJDUMP_RELEASE" "nvidia-cuda-nvdisasm==$CUOBJDUMP_RELEASE" 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    CUOBJDUMP=$(find "$SITE/nvidia" -path "*/bin/cuobjdump" 2>/dev/null | head -1)
  fi
fi
if [ -z "$CUOBJDUMP" ] || [ ! -x "$CUOBJDUMP" ]; then
  echo "cuda_compile_check: no cuobjdump (not in $CUDA_HOME/bin, and the pip packages did not install)" >&2
  exit 1
fi
say "SASS check of the vector kernels ($CUOBJDUMP)"
"$PY" "$ROOT/.ci/sass_check.py" "$SO" --cuobjdump "$CUOBJDUMP" || status=1

# Negative control: the offset kernels with the plain C++ vector access must
# fail the SASS check (split 32-bit stores, generic loads).
ARCH=${TORCH_CUDA_ARCH_LIST%%[ ;]*}
ARCH=${ARCH%+PTX}
ARCH="sm_${ARCH//./}"
# The C++ standard torch's headers need (C++20 from 2.13 on) and their include paths.
read -r STD TORCH_INC < <("$PY" -c '
import torch, torch.utils.cpp_extension as c
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print(20 if v >= (2, 13) else 17, " ".join("-I" + p for p in c.include_paths()))' 2>/dev/null)
say "negative control: cuda/offset_launch.cu with -DKVCOMM_PLAIN_CXX_VECTOR_ACCESS ($ARCH, C++$STD)"
# shellcheck disable=SC2086
if ! "$CUDA_HOME/bin/nvcc" -std=c++$STD -O3 -arch="$ARCH" -cubin $TORCH_INC -I"$WORK/src/cpp" -I"$WORK/src/cpp/include" \
     -I"$WORK/src/cuda" -DKVCOMM_PLAIN_CXX_VECTOR_ACCESS "$WORK/src/cuda/offset_launch.cu" -o "$WORK/control.cubin" \
     > "$WORK/control.log" 2>&1; then
  tail -20 "$WORK/control.log" >&2
  echo "cuda_compile_check: the negative control did not compile" >&2
  status=1
elif "$PY" "$ROOT/.ci/sass_check.py" "$WORK/control.cubin" --cuobjdump "$CUOBJDUMP" --kernels offset \
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
