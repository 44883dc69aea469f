"""Merges `kvcomm eval --sweep` results run over disjoint parts of one grid into one file.

A full grid takes hours on CPU; two sweeps on two cores, each with its own share of the
points (`--sweep-gammas` / `--sweep-capacities`), run it in half the time. Their dense
passes are identical (deterministic, same questions), so their rows belong in one table:

    python benchmarks/merge_sweeps.py a.json b.json --json results/sweep/eval-gsm8k-smollm2-135m-sweep.json

Refuses sweeps whose settings (task, graph, questions, model, ...) or dense accuracy
differ, and a grid point present in two of them. Prints the merged table (markdown).
"""
from __future__ import annotations

import argparse
import json
import sys

from .. import provenance
from ..bench import sweep
from ..runtime import report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", help="JSON files written by kvcomm eval --sweep")
    ap.add_argument("--json", metavar="PATH", help="write the merged sweep here")
    args = ap.parse_args(argv)
    docs = {}
    for path in args.sweeps:
        with open(path, encoding="utf-8") as f:
            docs[path] = json.load(f)
    try:
        merged = sweep.merge(docs)
    except ValueError as e:
        print(f"merge_sweeps: {e}", file=sys.stderr)
        return 2
    print(sweep.format_table(merged))
    if args.json:
        merged.update(provenance.capture("python", "benchmarks/merge_sweeps.py", argv=argv).fields())
        report.write_json(merged, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
