"""The summary of `kvcomm eval` over the first N measured questions of its records, or
over several runs' records pooled.

Compares a smaller run with a larger one on the same questions (the dense pass is
deterministic, and the measured questions are taken in order from the same offset):

    python benchmarks/eval_subset.py results/quality/eval-gsm8k-smollm2-135m.jsonl.gz --first 20

Pools runs over disjoint questions (e.g. `--offset 0` and `--offset 25`, each with its
own warm-up and an anchor pool that starts empty) into one summary:

    python benchmarks/eval_subset.py run-a.jsonl run-b.jsonl

Prints the summary's quality fields and per-agent TTFT as JSON (warm-up questions stay
in the records but, as in `kvcomm eval`, are not counted). `--json PATH` also writes it,
with the records it came from (path and measured questions of each) and its provenance
(`git_sha`, `git_dirty`, `command`), as a results file:

    python benchmarks/eval_subset.py run-a.jsonl run-b.jsonl --json results/quality/eval-pooled.json
"""
from __future__ import annotations

import argparse
import sys

from ..runtime import metrics
from ..runtime.records import MEASURE, read_records
from .summary import write_and_print

FIELDS = ("questions", "reuse_rate", "accuracy", "answer_agreement", "judge_consistency",
          "judge_without_choice", "first_token_agreement", "first_token_pairs", "first_token_agreement_reuse",
          "first_token_pairs_reuse",
          "agents")


def first_questions(records: list, n: int) -> list:
    """The records of the first n measured questions (both modes), warm-up kept."""
    order: list = []
    for r in records:
        if r.phase == MEASURE and r.question_id not in order:
            order.append(r.question_id)
    if n > len(order):
        raise SystemExit(f"the records hold {len(order)} measured questions, fewer than {n}")
    keep = set(order[:n])
    return [r for r in records if r.phase != MEASURE or r.question_id in keep]


def measured_ids(records: list) -> set:
    return {r.question_id for r in records if r.phase == MEASURE}


def pooled(runs: dict) -> list:
    """The records of several runs in one list; a question measured in two runs would be
    counted twice, so overlapping runs are refused."""
    out, seen = [], {}
    for path, records in runs.items():
        for qid in sorted(measured_ids(records)):
            if qid in seen:
                raise SystemExit(f"question {qid} is measured in both {seen[qid]} and {path}; "
                                 "pool only runs over disjoint questions")
            seen[qid] = path
        out.extend(records)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", help="the .jsonl files that `kvcomm eval --records` wrote")
    p.add_argument("--first", type=int, default=None,
                   help="only the first N measured questions (in file order; default: all)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the summary, its sources and provenance to PATH")
    args = p.parse_args(argv)
    if args.first is not None and args.first < 1:
        p.error(f"--first: at least 1 question, got {args.first}")
    runs = {path: read_records(path) for path in args.records}
    records = pooled(runs)
    if args.first is not None:
        records = first_questions(records, args.first)
    summary = metrics.summarize(records)
    out = {k: summary[k] for k in FIELDS if k in summary}
    kept = measured_ids(records)
    sources = [dict(records=path, questions=len(measured_ids(rs) & kept)) for path, rs in runs.items()]
    write_and_print(out, args.json, script="benchmarks/eval_subset.py", argv=argv, sources=sources)
    return 0


if __name__ == "__main__":
    sys.exit(main())
