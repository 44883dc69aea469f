"""Engine quality and TTFT on CPU: KVCOMM reuse path vs dense prefill, same prompts. Command-
line entry point; the code is kvcomm_app/bench/engine_quality.py (run with --help for the
options)."""
import sys

from kvcomm_app.bench.engine_quality import main

if __name__ == "__main__":
    sys.exit(main())
