"""What the entropy threshold's fallbacks protect, from a run that shared past it.

Run `kvcomm eval` with a gamma so large that every slot with two candidate anchors
shares (`--gamma 2`: the entropy of N candidates never exceeds 2 * log2 N) and with
`--records`. Every call records, per slot it reads, the entropy the pool saw
(`slot_gates`), so the default threshold's verdict can be replayed: a slot would have gone
to a new anchor at `--gamma G` when its entropy exceeds G * log2(candidates). This splits
the reuse-path calls that have a dense twin on identical inputs into those the threshold
at G would also have shared (`passes`: every slot under it) and those it would have sent
to a new anchor (`gated`: some slot above it), and reports first-token agreement with
dense for each group:

    python benchmarks/entropy_fallbacks.py results/quality/eval-mmlu-smollm2-135m-5a-gamma2.jsonl.gz --gamma 0.3

Prints a JSON summary; `--json PATH` also writes it with `sources` and provenance.
"""
from __future__ import annotations

import argparse
import math
import sys

from ..runtime import metrics, records
from ..runtime.metrics import REUSE
from ..runtime.records import MEASURE
from .summary import write_and_print


def slots_above_threshold(call, gamma: float) -> list[str]:
    """The slots of `call` whose recorded entropy is above gamma * log2(candidates)."""
    return sorted(slot for slot, g in (call.slot_gates or {}).items()
                  if g and g.get("candidates", 0) >= 2
                  and g["entropy"] > gamma * math.log2(g["candidates"]))


def split(records: list, gamma: float) -> dict:
    calls = [c for r in records if r.phase == MEASURE for c in r.calls]
    groups: dict[str, list[bool]] = {"passes": [], "gated": []}
    for dense, kv in metrics.first_token_pairs(calls):
        if kv.path != REUSE or dense.first_token_id is None or kv.first_token_id is None:
            continue
        group = "gated" if slots_above_threshold(kv, gamma) else "passes"
        groups[group].append(dense.first_token_id == kv.first_token_id)
    out = {"gamma": gamma}
    for name, agree in groups.items():
        out[name] = {"pairs": len(agree), "agree": sum(agree),
                     "agreement": round(sum(agree) / len(agree), 4) if agree else None}
    return out


def read_records(paths: list[str]) -> list:
    """The records of every file, in order (.jsonl or .jsonl.gz)."""
    return [r for path in paths for r in records.read_records(path)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", help="JSON-lines records of kvcomm eval --records")
    ap.add_argument("--gamma", type=float, default=0.3, help="the threshold to replay (default 0.3)")
    ap.add_argument("--json", metavar="PATH", help="also write the summary here")
    args = ap.parse_args(argv)
    if args.gamma < 0:
        ap.error(f"--gamma must be >= 0, got {args.gamma}")
    doc = split(read_records(args.records), args.gamma)
    if doc["passes"]["pairs"] + doc["gated"]["pairs"] == 0:
        print("entropy_fallbacks: no reuse-path calls with slot_gates and a dense twin in these records",
              file=sys.stderr)
        return 2
    write_and_print(doc, args.json, script="benchmarks/entropy_fallbacks.py", argv=argv, sources=args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
