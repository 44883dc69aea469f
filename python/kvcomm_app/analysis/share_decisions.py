"""The numbers behind the pool's share-or-anchor decisions of a `kvcomm eval --records` run:
which contents the entropy threshold sent to new anchors, and why.

Each KVCOMM call record carries `slot_gates` (the records' name for it): per slot, the
numbers behind the pool's share-or-anchor decision (docs/method.md, "Deciding"). A content is
decided once per request and every agent that reads it sees the same decision, so
decisions are counted once per (question, slot). Among those with at least two
candidates, it compares the ones whose entropy was above the threshold (new anchors) with
the ones shared: the gap between the two nearest candidates' distances, absolute and
relative to the nearest, and the entropy against its threshold.

    python benchmarks/share_decisions.py results/quality/eval-math500-smollm2-135m-5a-10.jsonl.gz

Prints a JSON summary (`--json PATH` also writes it, with `sources` and provenance).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from ..runtime.records import read_record_dicts
from .summary import write_and_print


def decisions(paths: list[str], phase: str = "measure") -> list[dict]:
    """One row per (run, question, slot): the first KVCOMM call's numbers and outcome."""
    rows, seen = [], set()
    for path in paths:
        for q in read_record_dicts(path):
            if q["mode"] != "kvcomm" or q["phase"] != phase:
                continue
            for call in q["calls"]:
                for slot, g in (call.get("slot_gates") or {}).items():
                    key = (path, q["question_id"], slot)
                    if key in seen or not g:
                        continue
                    seen.add(key)
                    decision = (call.get("slot_decisions") or {}).get(slot, "")
                    rows.append(dict(g, slot=slot, question_id=q["question_id"],
                                     outcome=_outcome(decision)))
    return rows


def _outcome(decision: str) -> str:
    # the pool's reason names: entropy_above_gate is the entropy above the threshold
    for name in ("too_few_candidates", "entropy_above_gate"):
        if decision.startswith(name):
            return name
    return "share" if decision.startswith("share") else decision or "unknown"


def summarize(rows: list[dict]) -> dict:
    out: dict = {"decisions": len(rows), "by_outcome": {}}
    for r in rows:
        out["by_outcome"][r["outcome"]] = out["by_outcome"].get(r["outcome"], 0) + 1
    compared = [r for r in rows if r["candidates"] >= 2 and len(r.get("nearest") or []) == 2]
    for outcome in ("entropy_above_gate", "share"):
        group = [r for r in compared if r["outcome"] == outcome]
        if not group:
            continue
        gaps = sorted(r["nearest"][1] - r["nearest"][0] for r in group)
        rel = sorted((r["nearest"][1] - r["nearest"][0]) / r["nearest"][1] for r in group if r["nearest"][1] > 0)
        out[outcome] = {
            "decisions": len(group),
            "gap_min": gaps[0], "gap_median": statistics.median(gaps), "gap_max": gaps[-1],
            "relative_gap_max": rel[-1] if rel else None, "relative_gap_min": rel[0] if rel else None,
            "nearest_min": min(r["nearest"][0] for r in group), "nearest_max": max(r["nearest"][0] for r in group),
            "entropy_minus_threshold_min": min(r["entropy"] - r["threshold"] for r in group),
            "entropy_minus_threshold_max": max(r["entropy"] - r["threshold"] for r in group),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", help="JSON-lines records written by kvcomm eval --records")
    ap.add_argument("--phase", default="measure", choices=("measure", "warmup"))
    ap.add_argument("--json", metavar="PATH", help="also write the summary here")
    args = ap.parse_args(argv)
    rows = decisions(args.records, args.phase)
    if not rows:
        print("share_decisions: no slot_gates in these records (written by an older kvcomm that did not "
              "record them?)", file=sys.stderr)
        return 2
    doc = summarize(rows)
    write_and_print(doc, args.json, script="benchmarks/share_decisions.py", argv=argv, sources=args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
