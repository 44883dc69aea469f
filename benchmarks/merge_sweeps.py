"""Merges `kvcomm eval --sweep` results run over disjoint parts of one grid into one file.
Command-line entry point; the code is kvcomm_app/bench/merge_sweeps.py (run with --help for
the options)."""
import sys

from kvcomm_app.bench.merge_sweeps import main

if __name__ == "__main__":
    sys.exit(main())
