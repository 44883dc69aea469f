"""Bytes, scale choice and estimate time of compact anchor storage.

The command line of kvcomm_app/bench/anchor_memory.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.anchor_memory import main

if __name__ == "__main__":
    sys.exit(main())
