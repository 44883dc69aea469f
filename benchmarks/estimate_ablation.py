"""Which part of the offset estimate decides first-token agreement with dense? Command-line
entry point; the code is kvcomm_app/bench/estimate_ablation.py (run with --help for the
options)."""
import sys

from kvcomm_app.bench.estimate_ablation import main

if __name__ == "__main__":
    sys.exit(main())
