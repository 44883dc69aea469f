"""What the entropy gate's fallbacks protect, from a run that shared past the gate. Command-
line entry point; the code is kvcomm_app/bench/gate_value.py (run with --help for the
options)."""
import sys

from kvcomm_app.bench.gate_value import main

if __name__ == "__main__":
    sys.exit(main())
