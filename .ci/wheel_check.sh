#!/usr/bin/env bash
# Builds the wheel and checks it installs into a fresh venv that has torch and
# passes an import-and-call smoke test. Needs the .venv from setup.sh. The
# fresh venv gets .venv's torch and numpy as hard links (.ci/venv_link.py),
# not a second unpacked copy: CI's disk is shared with the CUDA torch and the
# vLLM environment being installed beside this stage, and ran out once.
set -euo pipefail
cd "$(dirname "$0")/.."
. "${KVCOMM_VENV:-.venv}/bin/activate"
OUT=${WHEEL_DIR:-dist}
rm -rf "$OUT" && mkdir -p "$OUT"
MAX_JOBS=${MAX_JOBS:-2} pip wheel -q --no-build-isolation --no-deps -w "$OUT" .
WHEEL=$(ls "$OUT"/kvcomm-*.whl)
echo "wheel: $WHEEL ($(du -h "$WHEEL" | cut -f1))"
SMOKE_DIR=$(mktemp -d)
trap 'rm -rf "$SMOKE_DIR"' EXIT
SMOKE=$SMOKE_DIR/venv
python -m venv "$SMOKE"
python .ci/venv_link.py "$("$SMOKE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" torch numpy
"$SMOKE/bin/pip" install -q --disable-pip-version-check --no-deps "$WHEEL"
cd "$SMOKE/.."  # away from the source tree, so the installed wheel is imported
"$SMOKE/bin/python" - <<'PY'
import torch, kvcomm
from kvcomm import ops
assert "site-packages" in kvcomm.__file__, kvcomm.__file__
k = torch.randn(2, 2, 4, 64)
f = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
back = ops.rope_move(ops.rope_move(k, f, 5), f, -5)
torch.testing.assert_close(back, k, atol=1e-4, rtol=1e-4)
pool = kvcomm.AnchorPool(kvcomm.PoolConfig())
pool.add_anchor("user_question", k, k)
assert len(pool) == 1
import importlib.util
assert importlib.util.find_spec("kvcomm_app") is not None, "the wheel lacks the kvcomm_app package"
print("wheel smoke test passed:", kvcomm.__file__)
PY
# The console script comes from the same wheel (kvcomm_app.cli); --help loads no model.
HELP=$("$SMOKE/bin/kvcomm" --help)
case "$HELP" in *demo*) echo "console script kvcomm: ok" ;; *) echo "kvcomm --help lacks the demo command" >&2; exit 1 ;; esac
