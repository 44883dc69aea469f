"""How the pool's share-or-anchor decision (docs/method.md, "Deciding") goes on the TTFT
benchmark's inputs with the GPU benchmark's model: fresh filler texts through the
Llama-3.1-8B-shaped random model, cut to a few layers so it runs on a CPU.

The command line of kvcomm_app/bench/share_decisions_random_texts.py (`--help` lists the options)."""
import sys

from kvcomm_app.bench.share_decisions_random_texts import main

if __name__ == "__main__":
    sys.exit(main())
