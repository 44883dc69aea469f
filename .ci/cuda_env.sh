# Sourced by .ci/cuda_wheel.sh and .ci/cuda_compile_check.sh: the environment
# that builds kvcomm against the CUDA build of torch on a machine without a GPU.
#
#   VENV=path . .ci/cuda_env.sh
#
# Creates VENV when missing (with $KVCOMM_CUDA_PYTHON, default python3) and
# installs torch==$KVCOMM_CUDA_TORCH (default 2.14.1, CUDA 13.0; pip takes it
# from this machine's disk) with the build tools when it lacks them. Then sets
#   PY          VENV's python
#   SITE        its site-packages
#   CUOBJDUMP   cuobjdump: $CUDA_HOME/bin's, else the PyPI packages
#               nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, installed
#               into VENV (any 13.x reads sm_80..sm_90 code; this one is tested)
#   TORCH_RELEASE, and exports CUDA_HOME (default /usr/local/cuda), CPATH
#   (the CUDA library headers the torch wheels carry and torch's headers
#   include; the toolkit at CUDA_HOME may not have them) and PATH (ninja).
# Exits the calling script when nvcc or a tool is missing. Needs `say`.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_RELEASE=${KVCOMM_CUDA_TORCH:-2.14.1}
CUOBJDUMP_RELEASE=${KVCOMM_CUOBJDUMP_RELEASE:-13.2.51}

# (The grep drops pip's notes about this machine's empty local index dirs.)
cuda_env_pip() {
  "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "cuda_env: pip install $* failed" >&2; exit 1; }
}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_env: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
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
  cuda_env_pip "torch==$TORCH_RELEASE" ninja pybind11 setuptools wheel numpy
fi
say "torch $("$PY" -c 'import sys, torch; print(torch.__version__, "CUDA", torch.version.cuda, "Python", sys.version.split()[0])')"

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
NV_INC=$(find "$SITE/nvidia" -maxdepth 3 -type d -name include 2>/dev/null | sort | paste -sd: -)
export CPATH="${NV_INC}${CPATH:+:$CPATH}"
export PATH="$VENV/bin:$PATH"

CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ ! -x "$CUOBJDUMP" ]; then
  CUOBJDUMP=$(find "$SITE/nvidia" -path "*/bin/cuobjdump" 2>/dev/null | head -1)
  if [ -z "$CUOBJDUMP" ] || [ -z "$(find "$SITE/nvidia" -path "*/bin/nvdisasm" 2>/dev/null | head -1)" ]; then
    say "no cuobjdump in $CUDA_HOME/bin: installing nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm into $VENV"
    cuda_env_pip "nvidia-cuda-cuobjdump==$CUOBJDUMP_RELEASE" "nvidia-cuda-nvdisasm==$CUOBJDUMP_RELEASE"
    CUOBJDUMP=$(find "$SITE/nvidia" -path "*/bin/cuobjdump" 2>/dev/null | head -1)
  fi
fi
if [ -z "$CUOBJDUMP" ] || [ ! -x "$CUOBJDUMP" ]; then
  echo "cuda_env: no cuobjdump (not in $CUDA_HOME/bin, and the pip packages did not install)" >&2
  exit 1
fi
