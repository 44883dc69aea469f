#!/usr/bin/env bash
# Everything a session with a lent GPU has to run, sized for the device budget
# (15 minutes of device time per session, starts and idle time included; at
# most 10 minutes per call). One call does it all:
#
#   bash benchmarks/gpu_session.sh all          # = build ops ttft-share test ttft scaling
#
# or name stages:
#   build       the extension with its CUDA kernels (fails if an op has none)
#   test        the CUDA tests: ops, launches, the pool end to end, the engine's
#               exactness on the GPU
#   ops         op benchmark -> results/ops-<device>.json
#   ttft-share  the paper setting, every slot shared: the reuse path timed on
#               every call -> results/ttft-<device>-share-always.json
#   ttft        the same with the pool's entropy gate deciding, fallbacks
#               counted -> results/ttft-<device>.json
#   eager       ttft-share with the last token eager instead of a CUDA graph
#   scaling     TTFT vs agents and vs prefix (5 measured requests each)
#
# Stages run in the order given; `all` puts the measurements the issues' bars
# need first (ops.py checks every kernel against its torch twin before timing
# it, so its numbers are not taken on faith while the tests wait). Each stage
# is bounded by `timeout`: at most its own cap, and never past the deadline
# (KVCOMM_GPU_DEADLINE_S seconds after the start, default 540, inside a
# 600-second call). A stage that would get under 20 s (KVCOMM_GPU_MIN_STAGE_S)
# is skipped and reported.
#
# Logs and every result file written since the start collect in ./gpu-out
# (ignored by git; KVCOMM_GPU_WORK); after each stage they are packed into
# $OUT/gpu-session.tgz when $OUT is set: the device tool brings back at most 8
# files, and brings $OUT back even when the call is cut off. A failing stage is
# reported and the next still runs; the exit status is that of the first
# failure. Through the device tool: run `bash benchmarks/gpu_session.sh all`
# with timeout_s 600, then unpack gpu-session.tgz from its files_at.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${KVCOMM_GPU_WORK:-gpu-out}
mkdir -p "$WORK"
rm -rf "$WORK/results" "$WORK/docs" "$WORK"/*.log   # an earlier run's, not this one's
PY=${PYTHON:-python3}
DEADLINE=${KVCOMM_GPU_DEADLINE_S:-540}
MIN_STAGE=${KVCOMM_GPU_MIN_STAGE_S:-20}   # a stage that would get less is skipped
status=0
export PYTHONUNBUFFERED=1

run_stage() {  # name, cap in seconds, command...
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt "$MIN_STAGE" ]; then
    echo "== $name: SKIPPED (${left} s left before the ${DEADLINE} s deadline)"
    [ $status -eq 0 ] && status=124
    return
  fi
  local t0=$SECONDS
  echo "== $name (at ${t0} s, up to ${cap} s): $*"
  timeout --signal=INT --kill-after=10 "$cap" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then
    echo "== $name: ok in $((SECONDS - t0)) s"
  else
    [ $rc -eq 124 ] && echo "== $name: TIMED OUT after $((SECONDS - t0)) s" \
                    || echo "== $name: FAILED (exit $rc) after $((SECONDS - t0)) s"
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
[ ${#stages[@]} -eq 1 ] && [ "${stages[0]}" = all ] && stages=(build ops ttft-share test ttft scaling)
[ ${#stages[@]} -gt 0 ] || { echo "usage: $0 all | STAGE... (build test ops ttft-share ttft eager scaling)" >&2; exit 2; }
for stage in "${stages[@]}"; do
  case $stage in
    build|test|ops|ttft-share|ttft|eager|scaling) ;;
    *) echo "unknown stage '$stage' (all, build, test, ops, ttft-share, ttft, eager, scaling)" >&2; exit 2 ;;
  esac
done

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} >"$WORK/gpu.txt" 2>&1
# The extension with its CUDA kernels (a build that silently left them out would
# send every later stage to "no CUDA kernel" errors, so that is a build failure).
build_with_cuda() {
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
    export CUDA_HOME
  fi
  KVCOMM_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return
  "$PY" - <<'EOF'
import torch, kvcomm  # noqa: F401
names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kvcomm::"))
missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert names and not missing, f"built without CUDA kernels for: {missing or 'every op'}"
print(f"CUDA kernels for all {len(names)} kvcomm ops; GPU: {torch.cuda.get_device_name()}")
EOF
}
export -f build_with_cuda
export PY
TTFT=("$PY" -m kvcomm_app.cli bench ttft --device cuda --no-progress)
for stage in "${stages[@]}"; do
  case $stage in
    build)
      run_stage build 240 bash -c build_with_cuda ;;
    test)
      # The suites with GPU tests (the CPU ones and the kernels' host emulation run in
      # CI); test_engine_exact's CPU tests come along, cheap, on the GPU's torch.
      run_stage test 150 env KVCOMM_SKIP_EMULATION=1 "$PY" -m pytest -q -rs --maxfail=20 -p no:cacheprovider \
        tests/test_cuda_ops.py tests/test_cuda_launch_config.py tests/test_engine_exact.py ;;
    ops)
      run_stage ops 120 "$PY" benchmarks/ops.py --device cuda --md docs/benchmarks.md ;;
    ttft-share)
      run_stage ttft-share 150 "${TTFT[@]}" --share always ;;
    ttft)
      run_stage ttft 120 "${TTFT[@]}" ;;
    eager)
      run_stage eager 120 "${TTFT[@]}" --share always --step eager ;;
    scaling)
      run_stage scaling-agents 90 "${TTFT[@]}" --share always --scaling agents --requests 5 --warmup 3
      run_stage scaling-prefix 90 "${TTFT[@]}" --share always --scaling prefix --requests 5 --warmup 3 ;;
  esac
  collect
done
echo "== done at ${SECONDS} s, exit ${status}"
exit $status
