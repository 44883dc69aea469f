#!/usr/bin/env bash
# Client environments of the agent frameworks whose chat traffic benchmarks/chat records
# (docs/chat-frameworks.md): one virtual environment per framework, under build/.
#
#   bash .ci/chat_clients.sh [autogen|langgraph|all]     (default all; idempotent)
#   PYTHON=python3.11                                     the interpreter the venvs are made from
#
# Each framework gets an environment of its own, never build/venv-vllm or .venv: the
# frameworks pin protobuf, openai, pydantic and friends differently from vLLM (AutoGen
# downgrades protobuf, and vLLM's server then no longer imports). The clients need no
# kvcomm: they only talk HTTP to a server.
#
# Versions are pinned (top-level and the client library each one sends through), so a
# recorded fixture can be reproduced with the same client code; they are the versions
# tests/fixtures/chat/README.md names.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

AUTOGEN_PINS=(
  "autogen-agentchat==0.7.5"
  "autogen-ext[openai]==0.7.5"
  "autogen-core==0.7.5"
  "openai==3.63.0"
)
LANGGRAPH_PINS=(
  "langgraph==1.2.24"
  "langchain-openai==1.8.1"
  "langchain-core==1.8.3"
  "openai==3.63.0"
)

# setup NAME IMPORT_CHECK PINS...: creates build/venv-NAME when missing, installs the pins
# when `pip freeze` does not already show every one of them, and checks the imports.
setup() {
  local name=$1 check=$2
  shift 2
  local venv=build/venv-$name
  if [ ! -x "$venv/bin/python" ]; then
    echo "-- chat clients: creating $venv"
    "$PY" -m venv "$venv"
  fi
  local frozen missing=0 pin
  frozen=$("$venv/bin/python" -m pip freeze 2>/dev/null | tr 'A-Z_' 'a-z-')
  for pin in "$@"; do
    # 'autogen-ext[openai]==0.7.5' is frozen as 'autogen-ext==0.7.5'
    pin=$(echo "${pin/\[*\]/}" | tr 'A-Z_' 'a-z-')
    grep -qxF "$pin" <<<"$frozen" || missing=1
  done
  if [ "$missing" = 1 ]; then
    echo "-- chat clients: installing into $venv: $*"
    "$venv/bin/python" -m pip install -q "$@"
  fi
  "$venv/bin/python" -c "$check"
}

what=${1:-all}
case "$what" in
  autogen|all) ;;
  langgraph) ;;
  *) echo "usage: bash .ci/chat_clients.sh [autogen|langgraph|all]" >&2; exit 2 ;;
esac
if [ "$what" = autogen ] || [ "$what" = all ]; then
  setup autogen "
import importlib.metadata as m
import autogen_agentchat.agents, autogen_agentchat.teams, autogen_ext.models.openai
print('autogen: autogen-agentchat', m.version('autogen-agentchat'), 'autogen-ext', m.version('autogen-ext'),
      'openai', m.version('openai'))" "${AUTOGEN_PINS[@]}"
fi
if [ "$what" = langgraph ] || [ "$what" = all ]; then
  setup langgraph "
import importlib.metadata as m
import langgraph.graph, langchain_openai, langchain_core.tools
print('langgraph: langgraph', m.version('langgraph'), 'langchain-openai', m.version('langchain-openai'),
      'langchain-core', m.version('langchain-core'), 'openai', m.version('openai'))" "${LANGGRAPH_PINS[@]}"
fi
