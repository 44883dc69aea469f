"""Soak: the demo graph over many requests with a small pool byte budget.

The command line of kvcomm_app/bench/soak.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.soak import main

if __name__ == "__main__":
    sys.exit(main())
