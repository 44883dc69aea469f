"""Why the anchor pool's entropy gate fired, from `kvcomm eval --records` (session 8 on).
Command-line entry point; the code is kvcomm_app/bench/gate_numbers.py (run with --help for
the options)."""
import sys

from kvcomm_app.bench.gate_numbers import main

if __name__ == "__main__":
    sys.exit(main())
