"""`kvcomm serve` against plain vLLM in one server (results/vllm/serve.json).

Run in the vLLM environment (bash .ci/vllm.sh --setup-only; build/venv-vllm/bin/python).
The command line of kvcomm_app/bench/vllm_serve.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.vllm_serve import main

if __name__ == "__main__":
    sys.exit(main())
