"""The summary of `kvcomm eval` over the first N measured questions of its records, or over
several runs' records pooled. Command-line entry point; the code is
kvcomm_app/bench/eval_subset.py (run with --help for the options)."""
import sys

from kvcomm_app.bench.eval_subset import main

if __name__ == "__main__":
    sys.exit(main())
