"""The summary of `kvcomm eval` over the first N measured questions of its records.

Compares a smaller run with a larger one on the same questions (the dense pass is
deterministic, and the measured questions are taken in order from the same offset):

    python benchmarks/eval_subset.py results/eval-gsm8k-smollm2-135m.jsonl 20

Prints the summary's quality fields as JSON (warm-up questions stay in the records
but, as in `kvcomm eval`, are not counted).
"""
from __future__ import annotations

import argparse
import json
import sys

from kvcomm.runtime import metrics
from kvcomm.runtime.records import MEASURE, record_from_dict

FIELDS = ("questions", "reuse_rate", "accuracy", "answer_agreement", "judge_consistency",
          "judge_without_choice", "first_token_agreement", "first_token_pairs", "first_token_agreement_reuse")


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", help="the .jsonl that `kvcomm eval --records` wrote")
    p.add_argument("n", type=int, help="how many measured questions, from the first")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"n: at least 1 question, got {args.n}")
    with open(args.records) as f:
        records = [record_from_dict(json.loads(line)) for line in f if line.strip()]
    summary = metrics.summarize(first_questions(records, args.n))
    print(json.dumps({k: summary[k] for k in FIELDS if k in summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
