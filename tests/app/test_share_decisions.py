"""benchmarks/share_decisions.py: a content's decision counts once per (question, slot), and
the distance gaps of contents sent to new anchors and of shared ones are summarised apart."""
from __future__ import annotations

import gzip
import json

import pytest

from kvcomm_app.analysis import share_decisions


def _numbers(cands, near, entropy, threshold):
    return {"tokens": 10, "candidates": cands, "nearest": near, "entropy": entropy, "threshold": threshold,
            "top_prob": None}


def _question(qid, calls, mode="kvcomm", phase="measure"):
    return {"question_id": qid, "mode": mode, "phase": phase,
            "calls": [{"slot_gates": g, "slot_decisions": d} for g, d in calls]}


def _write(tmp_path):
    above = _numbers(2, [100.0, 101.0], 0.9, 0.3)
    shared = _numbers(3, [90.0, 120.0], 0.0, 0.475)
    cold = _numbers(0, [], 0.0, 0.0)
    rows = [
        # two agents read the same question: one decision
        _question("q1", [({"user_question": above}, {"user_question": "entropy_above_gate (new anchor)"}),
                         ({"user_question": above, "agent_0_current": shared},
                          {"user_question": "entropy_above_gate (new anchor)", "agent_0_current": "share"})]),
        _question("q2", [({"user_question": cold}, {"user_question": "too_few_candidates (new anchor)"})]),
        _question("q3", [({"user_question": shared}, {"user_question": "share (estimated from anchors [1])"})]),
        _question("q1", [({"user_question": above}, {"user_question": "baseline"})], mode="dense"),
        _question("w1", [({"user_question": above}, {"user_question": "entropy_above_gate (new anchor)"})],
                  phase="warmup"),
    ]
    path = tmp_path / "calls.jsonl.gz"   # what results/ keeps; a plain .jsonl reads the same
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_decisions_count_once_and_gaps_split_by_outcome(tmp_path):
    path = _write(tmp_path)
    out = tmp_path / "summary.json"
    assert share_decisions.main([path, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["decisions"] == 4
    assert doc["by_outcome"] == {"entropy_above_gate": 1, "share": 2, "too_few_candidates": 1}
    assert doc["entropy_above_gate"]["gap_max"] == pytest.approx(1.0)
    assert doc["entropy_above_gate"]["relative_gap_max"] == pytest.approx(1.0 / 101.0)
    assert doc["share"]["decisions"] == 2 and doc["share"]["gap_min"] == pytest.approx(30.0)
    assert doc["share"]["entropy_minus_threshold_max"] == pytest.approx(-0.475)
    assert doc["sources"] == [path] and doc["command"].startswith("python benchmarks/share_decisions.py")
    assert "git_sha" in doc and "git_dirty" in doc
    warm = share_decisions.summarize(share_decisions.decisions([path], "warmup"))
    assert warm["decisions"] == 1 and warm["by_outcome"] == {"entropy_above_gate": 1}


def test_records_without_decision_numbers_are_refused(tmp_path, capsys):
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(_question("q1", [({}, {"user_question": "share"})])) + "\n")
    assert share_decisions.main([str(path)]) == 2
    assert "no slot_gates" in capsys.readouterr().err
