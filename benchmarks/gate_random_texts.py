"""How the pool's share-or-anchor gate (SPEC section 4) decides on the TTFT benchmark's inputs
with the GPU benchmark's model: fresh filler texts through the Llama-3.1-8B-shaped random
model, cut to a few layers so it runs on a CPU. Command-line entry point; the code is
kvcomm_app/bench/gate_random_texts.py (run with --help for the options)."""
import sys

from kvcomm_app.bench.gate_random_texts import main

if __name__ == "__main__":
    sys.exit(main())
