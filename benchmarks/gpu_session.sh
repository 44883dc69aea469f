#!/usr/bin/env bash
# Everything a session with a lent GPU has to run, in stages that fit the device
# tool's 10-minute calls (a machine stays warm only seconds between calls, so every
# call builds first; the build is incremental when the tree is still there).
#
#   bash benchmarks/gpu_session.sh build test        # CUDA tests (issue 3)
#   bash benchmarks/gpu_session.sh build ops         # op benchmark -> results/ops-<device>.json
#   bash benchmarks/gpu_session.sh build ttft        # paper setting, graph + eager step
#   bash benchmarks/gpu_session.sh build scaling     # TTFT vs agents and vs prefix
#
# Logs and every result file go to $OUT (the device tool brings that folder back);
# without $OUT they stay in ./gpu-out. A failing stage is reported and the next
# stage still runs; the exit status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0

run_stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "== $name: ok in $((SECONDS - t0)) s"
  else
    local rc=$?
    echo "== $name: FAILED (exit $rc) after $((SECONDS - t0)) s; last lines of $OUT/$name.log:"
    tail -n 30 "$OUT/$name.log"
    [ $status -eq 0 ] && status=$rc
  fi
}

touch "$OUT/.start"
collect() {  # every result and doc written since this script started
  mkdir -p "$OUT/results" "$OUT/docs"
  find results docs -type f -newer "$OUT/.start" -exec cp -f --parents {} "$OUT/" \;
  return 0
}

for stage in "$@"; do
  case $stage in
    build)
      run_stage build env TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} \
        "$PY" -m pip install --no-build-isolation --no-deps -e . ;;
    test)
      nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv >"$OUT/gpu.txt" 2>&1
      run_stage test "$PY" -m pytest -q -rs tests/test_cuda_ops.py tests/test_pool.py tests/test_ops.py \
        tests/test_opcheck.py tests/test_engine_exact.py ;;
    ops)
      run_stage ops "$PY" benchmarks/ops.py --device cuda --md docs/benchmarks.md ;;
    ttft)
      run_stage ttft-graph kvcomm bench ttft --device cuda --no-progress
      run_stage ttft-eager kvcomm bench ttft --device cuda --step eager --no-progress \
        --json results/ttft-cuda-eager.json ;;
    scaling)
      run_stage scaling-agents kvcomm bench ttft --device cuda --scaling agents --no-progress
      run_stage scaling-prefix kvcomm bench ttft --device cuda --scaling prefix --no-progress ;;
    *)
      echo "unknown stage '$stage' (build, test, ops, ttft, scaling)" >&2
      exit 2 ;;
  esac
  collect
done
exit $status
