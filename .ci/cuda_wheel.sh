#!/usr/bin/env bash
# Builds the CUDA wheel of kvcomm (the C++ core plus the CUDA kernels) against
# the CUDA build of torch, and checks it without a GPU (docs/cuda-wheel.md):
#   - an object for every cuda/*.cu, and each object's compile time (ninja's log);
#   - per-kernel registers, stack, spills and local memory for every arch in
#     the library, failing on any spill (.ci/resource_check.py);
#   - every KV access of a vector kernel is one 128-bit global instruction
#     (.ci/sass_check.py);
#   - machine code for every arch asked for, and PTX where "+PTX" asks;
#   - a fresh venv with the torch it was built against takes `pip install
#     WHEEL` (its requirements met by that torch, nothing else installed),
#     and there `import kvcomm` works, every kvcomm op has a CUDA kernel, and
#     the CPU kernels run. The venv gets torch, numpy and what they require
#     as hard links to the build venv's installed files (.ci/venv_link.py):
#     the same files and records pip wrote, without unpacking 5.4 GB again.
# The wheel's version gets a local label naming CUDA and torch
# (0.1.0+cu130.torch2.14.1) and its torch requirement becomes that release:
# an extension runs only with the torch it was compiled against.
#
#   bash .ci/cuda_wheel.sh [VENV]          # wheel in build/cuda-wheel/
#
# VENV: the build environment with the CUDA torch (.ci/cuda_env.sh; default
# $KVCOMM_CUDA_VENV, else build/venv-cuda). Settings from the environment:
#   TORCH_CUDA_ARCH_LIST  default "8.0;8.6;8.9;9.0+PTX": A100, A10/A40/RTX 30,
#                         L4/L40/RTX 40, H100/H200 machine code, and PTX for
#                         later GPUs (compiled by the driver on first use)
#   MAX_JOBS              parallel compiles (default: all cores)
#   KVCOMM_CUDA_TORCH     torch release (default 2.14.1, CUDA 13.0)
#   WHEEL_DIR             where the wheel goes (default build/cuda-wheel)
#   KVCOMM_CUDA_WORK      build there and keep it (default: a temporary
#                         directory, removed at exit); KVCOMM_SRC another tree
# Exits non-zero on any failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${KVCOMM_SRC:-$ROOT}
VENV=${1:-${KVCOMM_CUDA_VENV:-$ROOT/build/venv-cuda}}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac   # the build runs in another directory
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}
export KVCOMM_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
WHEEL_DIR=${WHEEL_DIR:-$ROOT/build/cuda-wheel}
start=$(date +%s)
say() { echo "[cuda-wheel $(( $(date +%s) - start ))s] $*"; }
trap 'echo "cuda_wheel: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
. "$ROOT/.ci/cuda_env.sh"

if [ -n "${KVCOMM_CUDA_WORK:-}" ]; then
  WORK=$KVCOMM_CUDA_WORK
  rm -rf "$WORK" && mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvcomm-cuda-wheel.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir "$WORK/src"
# The files a fresh clone has (tracked + untracked, not ignored); no built .so.
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$SRC" && git ls-files -co --exclude-standard -z | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
    | tar -xf - -C "$WORK/src"
else
  cp -r "$SRC"/setup.py "$SRC"/pyproject.toml "$SRC"/README.md "$SRC"/cpp "$SRC"/cuda "$SRC"/python "$WORK/src/"
fi
find "$WORK/src" -name '_C*.so' -delete

# ptxas -v reports each kernel's registers and spills into the build log
# (read by resource_check.py); nvcc takes NVCC_APPEND_FLAGS from the environment.
say "building the wheel (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
(cd "$WORK/src" && NVCC_APPEND_FLAGS="-Xptxas=-v${NVCC_APPEND_FLAGS:+ $NVCC_APPEND_FLAGS}" \
   "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/raw" .) > "$WORK/build.log" 2>&1 || {
  # The compiler's errors first (the tail is pip's traceback), then the tail.
  grep -E "FAILED: |error:|#error" "$WORK/build.log" | head -40 >&2 || true
  tail -15 "$WORK/build.log" >&2
  echo "cuda_wheel: build FAILED" >&2
  exit 1
}
grep -E "warning" "$WORK/build.log" | grep -v -e "^ninja" -e "unknown-pragmas" -e "pragma unroll" -e "byte-compiling" \
  | head -20 || true

status=0
OBJ=$WORK/src/build/ext-objects
for cu in "$WORK"/src/cuda/*.cu; do
  stem=$(basename "$cu" .cu)
  if [ -z "$(find "$OBJ" -path "*/cuda/$stem.o" -print -quit)" ]; then
    echo "cuda_wheel: no object for cuda/$stem.cu" >&2
    status=1
  fi
done
# Compile time of each object (start and end in ms; the last entry per object).
say "compile time per object ($MAX_JOBS jobs; wall $(awk '!/^#/ {if (!s || $1 < s) s = $1; if ($2 > e) e = $2} END {printf "%.0f", (e - s) / 1000}' "$OBJ/.ninja_log") s):"
awk '!/^#/ {t[$4] = ($2 - $1) / 1000} END {for (o in t) printf "%8.1f s  %s\n", t[o], o}' "$OBJ/.ninja_log" \
  | sort -rn | sed "s|$OBJ/||"

# The wheel's version and torch requirement (see the header).
RAW=$(ls "$WORK"/raw/kvcomm-*.whl)
TORCH_BASE=${TORCH_RELEASE%%+*}
CU=$("$PY" -c 'import torch; print("cu" + torch.version.cuda.replace(".", ""))')
VERSION=$(basename "$RAW" | cut -d- -f2)+$CU.torch$TORCH_BASE
"$PY" -m wheel unpack -d "$WORK/stamp" "$RAW" >/dev/null
DIST=$(ls -d "$WORK"/stamp/kvcomm-*/kvcomm-*.dist-info)
sed -i -e "s/^Version: .*/Version: $VERSION/" -e "s/^Requires-Dist: torch\b.*/Requires-Dist: torch==$TORCH_BASE/" \
  "$DIST/METADATA"
grep -q "^Requires-Dist: torch==$TORCH_BASE$" "$DIST/METADATA" || { echo "cuda_wheel: no torch requirement to pin" >&2; exit 1; }
mv "$DIST" "$(dirname "$DIST")/kvcomm-$VERSION.dist-info"
mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/kvcomm-*.whl
"$PY" -m wheel pack -d "$WHEEL_DIR" "$(dirname "$DIST")" >/dev/null
WHEEL=$(ls "$WHEEL_DIR"/kvcomm-*.whl)
SO=$(find "$WORK/stamp" -name '_C*.so' -print -quit)
say "wheel: $WHEEL ($(du -h "$WHEEL" | cut -f1); library $(du -h "$SO" | cut -f1), $(ls "$WORK"/src/cuda/*.cu | wc -l) .cu files)"

say "resources per kernel (cuobjdump --dump-resource-usage, ptxas -v)"
"$PY" "$ROOT/.ci/resource_check.py" "$SO" --ptxas-log "$WORK/build.log" --cuobjdump "$CUOBJDUMP" || status=1
say "SASS check of the vector kernels"
"$PY" "$ROOT/.ci/sass_check.py" "$SO" --cuobjdump "$CUOBJDUMP" | tail -1 || status=1

# Machine code for every arch of the list; PTX for those marked +PTX.
ELF=$("$CUOBJDUMP" --list-elf "$SO" 2>/dev/null | { grep -o 'sm_[0-9]*a\?' || true; } | sort -u | paste -sd' ' -)
PTX=$("$CUOBJDUMP" --list-ptx "$SO" 2>/dev/null | { grep -o 'sm_[0-9]*a\?' || true; } | sort -u | paste -sd' ' -)
for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
  sm="sm_$(echo "${arch%+PTX}" | tr -d .)"
  case " $ELF " in *" $sm "*) ;; *) echo "cuda_wheel: no $sm machine code in the library (has: $ELF)" >&2; status=1 ;; esac
  if [ "$arch" != "${arch%+PTX}" ]; then
    case " $PTX " in *" $sm "*) ;; *) echo "cuda_wheel: no PTX for $sm (has: ${PTX:-none})" >&2; status=1 ;; esac
  fi
done
say "machine code: $ELF; PTX: ${PTX:-none}"

# The fresh venv (see the header); pip resolves the wheel's requirements
# against its torch (the pinned release: nothing to change; checked below).
say "installing $(basename "$WHEEL") into a fresh venv with torch $TORCH_RELEASE"
"$PY" -m venv "$WORK/fresh"
PY_FRESH=$WORK/fresh/bin/python
"$PY" "$ROOT/.ci/venv_link.py" "$("$PY_FRESH" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" torch numpy
PY="$PY_FRESH" cuda_env_pip --no-compile "$WHEEL"
(cd "$WORK" && "$PY_FRESH" - "$TORCH_BASE" <<'EOF') || status=1
import sys, torch, kvcomm
from kvcomm import ops
assert "site-packages" in kvcomm.__file__, kvcomm.__file__
assert torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda, torch.__version__
names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kvcomm::"))
assert len(names) >= 8, f"too few kvcomm ops registered: {names}"
missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
assert ops.kernel_device_types() == {"cpu", "cuda"}, ops.kernel_device_types()
k = torch.randn(2, 2, 4, 64)
f = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
torch.testing.assert_close(ops.rope_move(ops.rope_move(k, f, 5), f, -5), k, atol=1e-4, rtol=1e-4)
print(f"fresh venv: torch {torch.__version__}, kvcomm from {kvcomm.__file__}; CUDA kernels for all "
      f"{len(names)} ops: {', '.join(n.split('::')[1] for n in names)}; CPU rope_move round trip ok")
EOF

[ "$status" -eq 0 ] && say "OK: $WHEEL" || say "FAILED"
exit "$status"
