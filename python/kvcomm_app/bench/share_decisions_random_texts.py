"""How the pool's share-or-anchor decision (docs/method.md, "Deciding") goes on the TTFT benchmark's
inputs with the GPU benchmark's model: fresh filler texts through the Llama-3.1-8B-shaped
random model, cut to a few layers so it runs on a CPU.

For K texts of N tokens (each behind BOS, as the bench's inputs are encoded), text k is
matched against texts 0..k-1 as anchors with the core ops: raw Frobenius value
distances (kvcomm.ops.value_distances), then softmax / entropy / the threshold
(kvcomm.ops.match_decide, default tau 1, gamma 0.3). Reported per decision: the
nearest distance, the gap to the second nearest, the spread, the entropy against its
threshold, share or not. The gap is what the decision reads (softmax of -d/tau): on
random texts it is an accident of the draw.

    python benchmarks/share_decisions_random_texts.py --layers 2 --tokens 1024 --texts 8 \
        --json results/share-decisions/share-decisions-random-texts-cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch


def encode_values(model, bos: int, ids: list[int]) -> torch.Tensor:
    """Values [layers, kv_heads, n, head_dim] of ids behind BOS (the BOS dropped)."""
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([[bos] + ids]), use_cache=True)
    layers = out.past_key_values.layers
    return torch.stack([layer.values[0, :, 1:] for layer in layers]).contiguous()


def decisions(values: list[torch.Tensor], tau: float, gamma: float, top_p: float) -> list[dict]:
    from kvcomm import ops

    rows = []
    for k in range(2, len(values)):
        d = ops.value_distances(values[k], values[:k], False)
        _, entropy, share, _ = ops.match_decide(d, tau, gamma, top_p)
        srt = torch.sort(d).values
        rows.append({"text": k, "candidates": k, "nearest": float(srt[0]), "gap": float(srt[1] - srt[0]),
                     "spread_std": float(d.std()), "entropy_bits": float(entropy),
                     "threshold_bits": gamma * math.log2(k), "share": bool(share)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 8B-shaped model (default 2)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per text (default 1024, the bench's input)")
    p.add_argument("--texts", type=int, default=8, help="texts (default 8: 6 decisions)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the result here")
    args = p.parse_args(argv)
    if args.layers < 1 or args.tokens < 1 or args.texts < 3:
        print("share_decisions_random_texts: --layers and --tokens must be >= 1 and --texts >= 3", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    import kvcomm  # noqa: F401  (registers the ops)
    from .models import llama_8b_random
    from .texts import TextMaker
    from .. import provenance

    made = provenance.capture("python", "benchmarks/share_decisions_random_texts.py", argv=argv)
    t0 = time.perf_counter()
    model, tok = llama_8b_random("cpu", getattr(torch, args.dtype), num_hidden_layers=args.layers)
    maker, rng = TextMaker(tok), random.Random(args.seed)
    values = []
    for _ in range(args.texts):
        _, ids = maker.make(args.tokens, rng)
        values.append(encode_values(model, tok.bos_token_id, ids))
    rows = decisions(values, args.tau, args.gamma, args.top_p)
    for r in rows:
        print(f"text {r['text']}: nearest {r['nearest']:.2f}, gap {r['gap']:.3f}, spread {r['spread_std']:.3f}, "
              f"H {r['entropy_bits']:.3f} vs {r['threshold_bits']:.3f} bits -> "
              f"{'share' if r['share'] else 'new anchor'}")
    shared = sum(r["share"] for r in rows)
    print(f"shared {shared} of {len(rows)} decisions ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        doc = {"benchmark": "share_decisions_random_texts", "model": f"Llama-3.1-8B-shaped, random weights, "
               f"{args.layers} layers", "dtype": args.dtype, "tokens": args.tokens, "texts": args.texts,
               "tau": args.tau, "gamma": args.gamma, "top_p": args.top_p, "seed": args.seed,
               "value_rms": float(torch.stack([v.float().pow(2).mean() for v in values]).mean().sqrt()),
               "decisions": rows, "shared": shared, **made.fields(),
               "wall_s": time.perf_counter() - t0}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
