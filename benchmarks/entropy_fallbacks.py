"""What the entropy gate's fallbacks protect, from a run that shared past the gate.

The command line of kvcomm_app/bench/gate_value.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.gate_value import main

if __name__ == "__main__":
    sys.exit(main())
