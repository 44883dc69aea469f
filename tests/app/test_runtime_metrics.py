"""Metrics on hand-made records: every number below is worked out by hand."""
import math

import pytest

from kvcomm_app.runtime import metrics as M
from kvcomm_app.runtime.records import CallRecord, QuestionRecord, record_from_dict, record_to_dict


def call(q, mode, agent, path, ttft, *, phase="measure", rnd=0, digest="same", first=1,
         decision=False, shadow=False, call_mode=None):
    return CallRecord(question_id=q, mode=mode, phase=phase, round=rnd, agent_id=agent,
                      agent_name=f"a{agent}", role="r", call_mode=call_mode or mode, path=path,
                      reason="", ttft_ms=ttft, text="t", inputs_digest=digest, is_decision=decision,
                      shadow=shadow, first_token_id=first)


def question(q, mode, calls, *, pred, correct, choice=None, shadow_choice=None, phase="measure",
             pool=None):
    return QuestionRecord(question_id=q, task="toy", mode=mode, phase=phase, gold="1",
                          prediction=pred, correct=correct, final_text="", judge_choice=choice,
                          shadow_choice=shadow_choice, calls=calls,
                          pool_size=None if pool is None else pool[0],
                          pool_bytes=None if pool is None else pool[1])


@pytest.fixture
def records():
    # q1: dense run; kvcomm run with agent 0 dense (cold), agent 1 reuse, decision reuse + shadow.
    d1 = question("q1", "dense", [call("q1", "dense", "0", "dense", 100.0, first=5),
                                  call("q1", "dense", "1", "dense", 200.0, digest="x", first=6),
                                  call("q1", "dense", "2", "dense", 300.0, decision=True, digest="y")],
                  pred="7", correct=True, choice="7")
    k1 = question("q1", "kvcomm", [call("q1", "kvcomm", "0", "dense", 110.0, first=5),
                                   call("q1", "kvcomm", "1", "reuse", 40.0, digest="x", first=9),
                                   call("q1", "kvcomm", "2", "reuse", 50.0, decision=True, digest="z"),
                                   call("q1", "kvcomm", "2", "dense", 999.0, decision=True, digest="z",
                                        shadow=True, call_mode="dense")],
                  pred="7", correct=True, choice="7", shadow_choice="8", pool=(4, 4096))
    # q2: everything reused; kvcomm answer differs from dense; judge agrees with its shadow.
    d2 = question("q2", "dense", [call("q2", "dense", "0", "dense", 120.0, first=3),
                                  call("q2", "dense", "1", "dense", 260.0, first=4),
                                  call("q2", "dense", "2", "dense", 330.0, decision=True)],
                  pred="3", correct=False, choice="3")
    k2 = question("q2", "kvcomm", [call("q2", "kvcomm", "0", "reuse", 60.0, first=3),
                                   call("q2", "kvcomm", "1", "reuse", 20.0, first=4),
                                   call("q2", "kvcomm", "2", "reuse", 30.0, decision=True),
                                   call("q2", "kvcomm", "2", "dense", 999.0, decision=True,
                                        shadow=True, call_mode="dense")],
                  pred="1", correct=True, choice="1", shadow_choice="1", pool=(6, 8192))
    # a warm-up question that must not count in the measured phase
    w = question("w", "kvcomm", [call("w", "kvcomm", "0", "dense", 5000.0, phase="warmup")],
                 pred=None, correct=False, phase="warmup", pool=(2, 2048))
    return [w, d1, k1, d2, k2]


def test_reuse_rate_counts_kvcomm_calls_without_shadows(records):
    calls = M.all_calls(M.measured(records))
    assert M.reuse_rate(calls) == pytest.approx(5 / 6)
    assert M.reuse_rate(M.all_calls(M.measured(records, "warmup"))) == 0.0
    assert M.reuse_rate([]) is None
    assert M.path_counts(calls) == {"a0": {"reuse": 1, "partial": 0, "dense": 1},
                                    "a1": {"reuse": 2, "partial": 0, "dense": 0},
                                    "a2": {"reuse": 2, "partial": 0, "dense": 0}}


def test_accuracy_and_answer_agreement(records):
    qs = M.measured(records)
    assert M.accuracy(qs, "dense") == 0.5
    assert M.accuracy(qs, "kvcomm") == 1.0
    assert M.answer_agreement(qs) == 0.5           # q1 agrees (7 = 7), q2 does not (3 vs 1)
    assert M.accuracy([], "dense") is None


def test_answer_agreement_treats_two_missing_answers_as_agreement():
    qs = [question("a", "dense", [], pred=None, correct=False),
          question("a", "kvcomm", [], pred=None, correct=False),
          question("b", "dense", [], pred="1", correct=True),
          question("b", "kvcomm", [], pred=None, correct=False)]
    assert M.answer_agreement(qs) == 0.5


def test_judge_consistency_compares_with_the_shadow_on_same_inputs(records):
    qs = M.measured(records)
    assert M.judge_consistency(qs) == 0.5          # q1: 7 vs shadow 8; q2: 1 vs 1
    # a decision agent pinned to dense is consistent by construction
    pinned = question("p", "kvcomm", [call("p", "kvcomm", "2", "dense", 1.0, decision=True,
                                           call_mode="dense")], pred="1", correct=True, choice="1")
    assert M.judge_consistency(qs + [pinned]) == pytest.approx(2 / 3)
    # a question with neither a shadow nor a pinned decision is left out
    bare = question("b", "kvcomm", [call("b", "kvcomm", "2", "reuse", 1.0, decision=True)],
                    pred="1", correct=True, choice="1")
    assert M.judge_consistency(qs + [bare]) == 0.5


def test_first_token_agreement_only_on_identical_inputs(records):
    calls = M.all_calls(M.measured(records))
    pairs = M.first_token_pairs(calls)
    # q1: agent0 (same digest, 5 = 5), agent1 (same digest x, 6 vs 9), decision vs its shadow
    # (1 = 1); q1's dense decision had digest y != z: not a pair of its own.
    # q2: agent0 (3 = 3), agent1 (4 = 4), decision vs shadow (1 = 1).
    assert len(pairs) == 6
    rate, n = M.first_token_agreement(calls)
    assert (rate, n) == (pytest.approx(5 / 6), 6)
    rate, n = M.first_token_agreement(calls, reuse_only=True)
    assert (rate, n) == (pytest.approx(4 / 5), 5)


def test_per_agent_ttft_medians_and_speedup(records):
    table = M.per_agent_ttft(M.all_calls(M.measured(records)))
    assert list(table) == ["a0", "a1", "a2"]
    a0 = table["a0"]
    assert a0["ttft_ms_dense"] == pytest.approx(110.0)         # median of 100, 120
    assert a0["ttft_ms_kvcomm"] == pytest.approx(85.0)         # median of 110 (dense path), 60
    assert a0["speedup"] == pytest.approx(110.0 / 85.0)
    assert a0["ttft_ms_kvcomm_reuse_only"] == pytest.approx(60.0)
    assert a0["reuse_rate"] == 0.5 and a0["paths"] == {"reuse": 1, "partial": 0, "dense": 1}
    a2 = table["a2"]                                           # shadows (999 ms) excluded
    assert a2["ttft_ms_kvcomm"] == pytest.approx(40.0) and a2["calls_kvcomm"] == 2
    assert a2["ttft_ms_dense"] == pytest.approx(315.0)
    assert a2["is_decision"] and not a0["is_decision"]
    means = M.per_agent_ttft(M.all_calls(M.measured(records)), stat=lambda xs: sum(xs) / len(xs))
    assert means["a1"]["ttft_ms_kvcomm"] == pytest.approx(30.0)


def test_pool_stats_and_summary(records):
    assert M.pool_stats(records) == {"anchors": 6, "bytes": 8192}
    assert M.pool_stats([]) == {"anchors": None, "bytes": None}
    s = M.summarize(records)
    assert s["questions"] == 2
    assert s["reuse_rate"] == pytest.approx(5 / 6)
    assert s["accuracy"] == {"dense": 0.5, "kvcomm": 1.0}
    assert s["answer_agreement"] == 0.5 and s["judge_consistency"] == 0.5
    w = M.summarize(records, "warmup")
    assert w["questions"] == 1 and w["reuse_rate"] == 0.0
    assert math.isclose(w["agents"]["a0"]["ttft_ms_kvcomm"], 5000.0)


def test_records_round_trip_through_dicts(records):
    for r in records:
        again = record_from_dict(record_to_dict(r))
        assert again == r


def test_judge_without_choice_counts_shadow_pairs_where_nobody_chose(records):
    qs = M.measured(records)
    assert M.judge_without_choice(qs) == 0          # q1 and q2 both have choices
    silent = question("s", "kvcomm", [call("s", "kvcomm", "2", "reuse", 1.0, decision=True),
                                      call("s", "kvcomm", "2", "dense", 1.0, decision=True, shadow=True)],
                      pred=None, correct=False, choice=None)
    assert M.judge_without_choice(qs + [silent]) == 1
    assert M.summarize(qs + [silent])["judge_without_choice"] == 1
