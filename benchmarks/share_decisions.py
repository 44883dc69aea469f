"""Why the anchor pool's entropy gate fired, from `kvcomm eval --records`.

The command line of kvcomm_app/bench/gate_numbers.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.gate_numbers import main

if __name__ == "__main__":
    sys.exit(main())
