#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the main job: `kvcomm demo` on the embedded
# SmolLM2-135M-Instruct. Extra arguments go to `kvcomm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
. "${KVCOMM_VENV:-.venv}/bin/activate"
exec kvcomm demo "$@"
