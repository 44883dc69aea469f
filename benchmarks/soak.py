"""Soak: the demo graph over many requests with a small pool byte budget (issue 7.5). Command-
line entry point; the code is kvcomm_app/bench/soak.py (run with --help for the options)."""
import sys

from kvcomm_app.bench.soak import main

if __name__ == "__main__":
    sys.exit(main())
