"""What the entropy threshold's fallbacks protect, from a run that shared past it.

The command line of kvcomm_app/analysis/entropy_fallbacks.py (`--help` lists the options)."""
import sys

from kvcomm_app.analysis.entropy_fallbacks import main

if __name__ == "__main__":
    sys.exit(main())
