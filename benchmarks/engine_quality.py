"""Engine quality and TTFT on CPU: KVCOMM reuse path vs dense prefill, same prompts.

The command line of kvcomm_app/bench/engine_quality.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.engine_quality import main

if __name__ == "__main__":
    sys.exit(main())
