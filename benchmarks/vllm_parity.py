"""The vLLM connector against KVCommEngine on the same 3- and 5-agent calls (results/vllm/parity.json).

Run in the vLLM environment (bash .ci/vllm.sh --setup-only; build/venv-vllm/bin/python).
The command line of kvcomm_app/bench/vllm_parity.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.vllm_parity import main

if __name__ == "__main__":
    sys.exit(main())
