"""benchmarks/entropy_fallbacks.py: reuse-path calls with a dense twin on identical inputs
are split by whether the replayed entropy threshold would have sent one of their slots to a
new anchor."""
from __future__ import annotations

import json

from kvcomm_app.analysis import entropy_fallbacks
from kvcomm_app.runtime.records import CallRecord, QuestionRecord, record_to_dict

NEAR_TIE = {"tokens": 9, "candidates": 2, "entropy": 0.9, "nearest": [100.0, 100.5]}   # > 0.3 * log2 2
CLEAR = {"tokens": 9, "candidates": 4, "entropy": 0.1, "nearest": [50.0, 90.0]}        # < 0.3 * log2 4


def _call(mode, agent, token, *, path="dense", slot_gates=None, digest="same"):
    return CallRecord(question_id="q", mode=mode, phase="measure", round=0, agent_id=agent,
                      agent_name=agent, role=agent, call_mode=mode, path=path, reason="", ttft_ms=1.0,
                      text="", inputs_digest=digest, first_token_id=token, slot_gates=slot_gates or {})


def _write(tmp_path):
    dense = [_call("dense", a, 7) for a in ("a", "b", "c", "d")]
    kv = [_call("kvcomm", "a", 7, path="reuse", slot_gates={"user_question": CLEAR}),
          _call("kvcomm", "b", 8, path="reuse",
                slot_gates={"user_question": CLEAR, "agent_a_current": NEAR_TIE}),
          _call("kvcomm", "c", 7, path="reuse", slot_gates={"user_question": NEAR_TIE}, digest="other"),  # no twin
          _call("kvcomm", "d", 7, path="dense", slot_gates={"user_question": CLEAR})]   # not reuse
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record_to_dict(QuestionRecord(
        question_id="q", task="t", mode=m, phase="measure", gold="", prediction=None, correct=False,
        final_text="", judge_choice=None, calls=calls))) + "\n" for m, calls in (("dense", dense), ("kvcomm", kv))))
    return str(path)


def test_reuse_calls_split_by_the_replayed_threshold(tmp_path):
    path = _write(tmp_path)
    out = tmp_path / "value.json"
    assert entropy_fallbacks.main([path, "--gamma", "0.3", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["passes"] == {"pairs": 1, "agree": 1, "agreement": 1.0}
    assert doc["gated"] == {"pairs": 1, "agree": 0, "agreement": 0.0}
    assert doc["command"].startswith("python benchmarks/entropy_fallbacks.py")
    # A looser threshold lets the near-tie through: both calls pass.
    loose = entropy_fallbacks.split(entropy_fallbacks.read_records([path]), gamma=1.0)
    assert loose["passes"]["pairs"] == 2 and loose["gated"]["pairs"] == 0


def test_records_without_reuse_pairs_are_refused(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert entropy_fallbacks.main([str(path)]) == 2
    assert "no reuse-path calls" in capsys.readouterr().err
