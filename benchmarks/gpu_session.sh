#!/usr/bin/env bash
# Everything a session with a lent GPU has to run, in one call of at most 600 s
# (the device budget is about 15 minutes per session, starts and idle time
# included). Through the device tool: run
#
#   bash benchmarks/gpu_session.sh all          # = build test ops ttft scaling
#
# with timeout_s 600, then unpack gpu-session.tgz from its files_at. Or name
# stages, run in the order given:
#   build       the extension with its CUDA kernels (fails if an op has none);
#               if `pip install -e .` into the image's Python fails (no pip, an
#               externally managed environment, ...), `setup.py build_ext
#               --inplace` instead, and the later stages get PYTHONPATH=python
#   test        the GPU tests: tests/ops on the cuda backend (CUDA kernels vs
#               the reference and the CPU ops, graphs, streams, no host syncs,
#               grids at the limits, the pool end to end) and the engine's
#               exactness tests; the CPU and emulated backends run in CI
#   ops         op benchmark (each kernel checked against its torch twin
#               before it is timed) -> results/, docs/benchmarks.md
#   ttft        = ttft-share then ttft-gate:
#   ttft-share  the paper setting, every slot shared: the reuse path timed on
#               every call (random weights: the gate's decision means nothing)
#   ttft-gate   the same with the pool's entropy gate deciding, fallbacks counted
#   eager       ttft-share with the last token eager instead of a CUDA graph
#   ttft-int8   ttft-share with int8 anchors (--anchor-storage int8): the CUDA
#               kernels reading compact anchors, timed on the reuse path (not
#               in `all`; run it in a second call: `build ttft-int8`)
#   scaling     TTFT vs agents and vs prefix (5 measured requests each)
#
# Time. Every stage runs under `timeout`: at most its cap, never past the
# deadline (KVCOMM_GPU_DEADLINE_S after the start, default 540 s, leaving 60 s
# of the call for packing and transfer). A stage that would get less than
# KVCOMM_GPU_MIN_STAGE_S (default 20 s) is skipped. The caps put the tests
# first: build (180 s) and test (180 s) are done by 360 s at the latest, and
# the benchmarks share what is left. The build cap comes from the per-object
# compile times of docs/cuda-wheel.md (arch 9.0a, one job, 2-core machine):
# the longest object takes ~20-30 s and objects are split so that no CUDA
# one is near it (one file per anchor code type), so 16 cores build in well
# under a minute; tests/ops/test_gpu_session.py keeps the cap at 3x or more
# of that estimate. The build log lists each object's time on the device.
#
# Output. Logs, and every result or doc file written since the start, collect
# in ./gpu-out (KVCOMM_GPU_WORK), packed after each stage into
# $OUT/gpu-session.tgz when $OUT is set (the device tool brings back $OUT even
# when the call is cut off). The script ends with a summary: each stage's
# status (ok, FAILED, TIMED OUT, SKIPPED) and time, and the test counts. A
# failing stage does not stop the next; the exit status is the first failure's
# (124 for a time-out or a skipped stage, 2 for unknown stages).
#
# Dry run on a machine without a GPU (KVCOMM_GPU_DRY_RUN=1): the same plan
# with each stage's CPU equivalent: a CPU build (checked for CPU kernels),
# the same pytest command (its CUDA tests skip; collection and the CPU tests
# run), ops.py --quick on the CPU, TTFT and scaling with the tiny random
# model at small sizes, all output under gpu-out/dry (results/ and docs/ are
# not written). It exercises the control flow, deadlines, packing, summary
# and the build fallback (KVCOMM_GPU_SKIP_PIP=1 pretends pip failed); it does
# not exercise nvcc, the CUDA kernels, CUDA graphs or GPU timings.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${KVCOMM_GPU_WORK:-gpu-out}
mkdir -p "$WORK"
rm -rf "$WORK/results" "$WORK/docs" "$WORK/dry" "$WORK"/*.log "$WORK/build.env"  # an earlier run's
PY=${PYTHON:-python3}
DEADLINE=${KVCOMM_GPU_DEADLINE_S:-540}
MIN_STAGE=${KVCOMM_GPU_MIN_STAGE_S:-20}
DRY=${KVCOMM_GPU_DRY_RUN:-0}
status=0
export PYTHONUNBUFFERED=1
SUMMARY=()

note() {  # stage, status, seconds, detail
  SUMMARY+=("$(printf '   %-15s %-10s %5s  %s' "$1" "$2" "$3" "${4:-}")")
}

run_stage() {  # name, cap in seconds, command...
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt "$MIN_STAGE" ]; then
    echo "== $name: SKIPPED (${left} s left before the ${DEADLINE} s deadline)"
    note "$name" SKIPPED - "${left} s left"
    [ $status -eq 0 ] && status=124
    return
  fi
  local t0=$SECONDS
  echo "== $name (at ${t0} s, up to ${cap} s): $*"
  timeout --signal=INT --kill-after=10 "$cap" "$@" >"$WORK/$name.log" 2>&1
  local rc=$? took=$((SECONDS - t0))
  # pytest's closing line, when the stage ran it
  local counts
  counts=$(grep -E "^=*.* (passed|failed|error|skipped|no tests ran).* in [0-9.]+s" "$WORK/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  if [ $rc -eq 0 ]; then
    echo "== $name: ok in ${took} s"
    note "$name" ok "$took" "$counts"
  else
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then  # 137: killed 10 s after the interrupt
      rc=124
      echo "== $name: TIMED OUT after ${took} s"
      note "$name" "TIMED OUT" "$took" "$counts"
    else
      echo "== $name: FAILED (exit $rc) after ${took} s"
      note "$name" "FAILED $rc" "$took" "$counts"
    fi
    echo "   last lines of $WORK/$name.log:"
    tail -n 25 "$WORK/$name.log" | sed 's/^/   /'
    [ $status -eq 0 ] && status=$rc
  fi
}

touch "$WORK/.start"
collect() {  # every result and doc written since this script started, packed for $OUT
  find results docs -type f -newer "$WORK/.start" -exec cp -f --parents {} "$WORK/" \; 2>/dev/null
  [ -z "${OUT:-}" ] || tar -czf "$OUT/gpu-session.tgz" -C "$WORK" --exclude=.start .
  return 0
}

stages=("$@")
[ ${#stages[@]} -eq 1 ] && [ "${stages[0]}" = all ] && stages=(build test ops ttft scaling)
STAGES="build test ops ttft ttft-share ttft-gate eager ttft-int8 scaling"
[ ${#stages[@]} -gt 0 ] || { echo "usage: $0 all | STAGE... ($STAGES)" >&2; exit 2; }
for stage in "${stages[@]}"; do
  case " $STAGES " in
    *" $stage "*) ;;
    *) echo "unknown stage '$stage' (all, ${STAGES// /, })" >&2; exit 2 ;;
  esac
done

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  mkdir -p "$WORK/dry"
  echo "== DRY RUN on the CPU: each stage's CPU equivalent, output under $WORK/dry"
else
  DEVICE=cuda
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
  command -v nvcc >/dev/null && nvcc --version | tail -2 | head -1
} >"$WORK/gpu.txt" 2>&1

# The extension (with its CUDA kernels unless dry): a build that silently left
# the kernels out would send every later stage to "no CUDA kernel" errors, so
# that is a build failure. Writes $WORK/build.env when later stages need
# PYTHONPATH (the in-place fallback).
build() {
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
    export CUDA_HOME
  fi
  if [ "$DRY" != 1 ]; then
    export KVCOMM_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
  fi
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  local rc=1
  if [ "${KVCOMM_GPU_SKIP_PIP:-0}" != 1 ]; then
    "$PY" -m pip install --no-build-isolation --no-deps -e .
    rc=$?
  fi
  if [ $rc -ne 0 ]; then
    echo "-- pip install -e . did not work (exit $rc): setup.py build_ext --inplace, PYTHONPATH=python"
    "$PY" setup.py build_ext --inplace || return
    export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
    echo "export PYTHONPATH=\"$PYTHONPATH\"" >"$WORK/build.env"
  fi
  # Each object's compile time from ninja's log (the last build of each): the
  # numbers the build cap is sized from (docs/cuda-wheel.md).
  echo "-- compile time per object:"
  awk '!/^#/ {t[$4] = ($2 - $1) / 1000} END {for (o in t) printf "%8.1f s  %s\n", t[o], o}' \
    build/ext-objects/.ninja_log 2>/dev/null | sort -rn | sed "s|$PWD/build/ext-objects/||"
  KVCOMM_WANT=$DEVICE "$PY" - <<'EOF'
import os, torch, kvcomm
from kvcomm import ops
want = os.environ["KVCOMM_WANT"]
have = ops.kernel_device_types()
assert want in have, f"kvcomm at {kvcomm.__file__} was built without {want} kernels (has: {sorted(have)})"
where = torch.cuda.get_device_name() if want == "cuda" else "CPU (dry run)"
print(f"kvcomm {kvcomm.__file__}: kernels for {sorted(have)}; running on {where}")
EOF
}
export -f build
export PY DEVICE DRY WORK

cli() {  # the CLI's module: kvcomm_app.cli where the application is its own package
  if "$PY" -c 'import kvcomm_app.cli' >/dev/null 2>&1; then echo kvcomm_app.cli; else echo kvcomm.cli; fi
}
test_paths() {
  local p out=()
  for p in tests/ops tests/engine/test_engine_exact.py tests/test_engine_exact.py; do
    [ -e "$p" ] && out+=("$p")
  done
  echo "${out[@]}"
}

for stage in "${stages[@]}"; do
  if [ "$DRY" = 1 ]; then
    TTFT=("$PY" -m "$(cli)" bench ttft --device cpu --model tiny-random --agents 3 --prefix 48 --input 64
          --output 16 --requests 2 --warmup 2 --no-progress --no-write)
    OPS=("$PY" benchmarks/ops.py --device cpu --quick --out "$WORK/dry/ops.json" --md "$WORK/dry/benchmarks.md")
    AGENTS=(--values 2,3) PREFIXES=(--values 40,48) SCALE=()
  else
    TTFT=("$PY" -m "$(cli)" bench ttft --device cuda --no-progress)
    OPS=("$PY" benchmarks/ops.py --device cuda --md docs/benchmarks.md)
    AGENTS=() PREFIXES=() SCALE=(--requests 5 --warmup 3)
  fi
  case $stage in
    build)
      run_stage build 180 bash -c build
      [ -f "$WORK/build.env" ] && . "$WORK/build.env" ;;
    test)
      # shellcheck disable=SC2046
      # -k cuda: the GPU tests only (ids and names say cuda); their CPU twins run in CI.
      run_stage test 180 env KVCOMM_TEST_BACKENDS=cuda "$PY" -m pytest -q -rs --maxfail=20 -p no:cacheprovider \
        --durations=15 -k cuda $(test_paths) ;;
    ops)
      run_stage ops 90 "${OPS[@]}" ;;
    ttft|ttft-share|ttft-gate)
      [ "$stage" != ttft-gate ] && run_stage ttft-share 100 "${TTFT[@]}" --share always
      [ "$stage" != ttft-share ] && run_stage ttft-gate 80 "${TTFT[@]}" ;;
    eager)
      run_stage eager 80 "${TTFT[@]}" --share always --step eager ;;
    ttft-int8)
      run_stage ttft-int8 100 "${TTFT[@]}" --share always --anchor-storage int8 ;;
    scaling)
      run_stage scaling-agents 60 "${TTFT[@]}" --share always --scaling agents "${SCALE[@]}" "${AGENTS[@]}"
      run_stage scaling-prefix 60 "${TTFT[@]}" --share always --scaling prefix "${SCALE[@]}" "${PREFIXES[@]}" ;;
  esac
  collect
done
echo "== summary ($([ "$DRY" = 1 ] && echo "DRY RUN, CPU" || echo "$(head -2 "$WORK/gpu.txt" | tail -1)"); ${SECONDS} s of the ${DEADLINE} s deadline)"
printf '   %-15s %-10s %5s  %s\n' stage status s "tests"
printf '%s\n' "${SUMMARY[@]}"
echo "== done at ${SECONDS} s, exit ${status}"
collect
exit $status
