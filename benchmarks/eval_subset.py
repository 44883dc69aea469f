"""The summary of `kvcomm eval` over the first N measured questions of its records, or over
several runs' records pooled.

The command line of kvcomm_app/analysis/eval_subset.py (`--help` lists the options)."""
import sys

from kvcomm_app.analysis.eval_subset import main

if __name__ == "__main__":
    sys.exit(main())
