"""Merges `kvcomm eval --sweep` results run over disjoint parts of one grid into one file.

The command line of kvcomm_app/analysis/merge_sweeps.py (`--help` lists the options)."""
import sys

from kvcomm_app.analysis.merge_sweeps import main

if __name__ == "__main__":
    sys.exit(main())
