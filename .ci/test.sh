#!/usr/bin/env bash
# Sets up (see setup.sh) and runs every test: the pytest suites and the C++
# GoogleTest suite through ctest, built with ASan + UBSan unless
# KVCOMM_SANITIZE=OFF. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stamp() { echo "-- $1 ($(( $(date +%s) - start )) s)"; }
stamp "setup"
bash .ci/setup.sh
. "${KVCOMM_VENV:-.venv}/bin/activate"

stamp "pytest"
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure here too.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
[ "$rc" -eq 0 ] || exit "$rc"

stamp "C++ suite (cmake + ctest)"
BUILD=build/cmake
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVCOMM_SANITIZE="${KVCOMM_SANITIZE:-ON}" \
  -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
stamp "tests done"
