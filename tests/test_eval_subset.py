"""benchmarks/eval_subset.py: the first N measured questions of an eval's records; over
all of them it must give back the summary the eval itself wrote."""
from __future__ import annotations

import json
import os

import pytest

from benchmark_modules import load_benchmark
from kvcomm.runtime.records import record_from_dict

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
subset = load_benchmark("eval_subset")
RUN = os.path.join(ROOT, "results", "eval-humaneval-smollm2-135m")


def _records():
    with open(RUN + ".jsonl") as f:
        return [record_from_dict(json.loads(line)) for line in f]


def test_all_questions_give_the_evals_own_summary():
    with open(RUN + ".json") as f:
        written = json.load(f)
    records = _records()
    n = written["questions"]
    got = subset.metrics.summarize(subset.first_questions(records, n))
    for key in ("questions", "reuse_rate", "accuracy", "answer_agreement", "judge_consistency",
                "first_token_agreement", "first_token_pairs", "first_token_agreement_reuse"):
        assert got[key] == pytest.approx(written[key]), key


def test_a_prefix_keeps_both_modes_of_the_first_questions_and_the_warm_up():
    records = _records()
    sub = subset.first_questions(records, 10)
    measured = [r for r in sub if r.phase == "measure"]
    ids = {r.question_id for r in measured}
    assert len(ids) == 10 and len(measured) == 20
    assert sorted(r.mode for r in measured) == ["dense"] * 10 + ["kvcomm"] * 10
    assert [r for r in records if r.phase != "measure"] == [r for r in sub if r.phase != "measure"]
    with pytest.raises(SystemExit, match="fewer than"):
        subset.first_questions(records, 1000)
