"""Framework traffic through `kvcomm serve`, every call paired with plain vLLM (results/chat/<name>.json).

Run in the vLLM environment (build/venv-vllm/bin/python). The command line of
kvcomm_app/bench/chat_paired.py (`--help` lists the options); `kvcomm bench chat` is the same."""
import sys

from kvcomm_app.bench.chat_paired import main

if __name__ == "__main__":
    sys.exit(main())
