"""The numbers behind the pool's share-or-anchor decisions of a `kvcomm eval --records` run.

The command line of kvcomm_app/analysis/share_decisions.py (`--help` lists the options)."""
import sys

from kvcomm_app.analysis.share_decisions import main

if __name__ == "__main__":
    sys.exit(main())
