"""Which part of the offset estimate decides first-token agreement with dense?

The command line of kvcomm_app/bench/estimate_ablation.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.estimate_ablation import main

if __name__ == "__main__":
    sys.exit(main())
