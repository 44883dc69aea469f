"""The graph runner on real workloads (GSM8K, MMLU, HumanEval data) with the scripted
engine standing in for the model: tools, decision agent, shadow calls, records."""
import re

import pytest

from kvcomm_app.runtime.compare import run_comparison
from kvcomm_app.runtime.datasets import load_gsm8k, load_humaneval, load_mmlu
from kvcomm_app.runtime.executor import GraphRunner
from kvcomm_app.runtime.graph import build_graph
from kvcomm_app.runtime.metrics import summarize
from kvcomm_app.runtime.records import WARMUP
from kvcomm_app.runtime.testing import ScriptedEngine
from kvcomm_app.runtime.topology import fully_connected
from kvcomm_app.runtime.workloads import code_workload, math_workload, mmlu_workload


def build(workload, n):
    return build_graph(fully_connected(n), workload.roles, workload.decision_role, workload.question_label)


def gold_responder(gold_of_question):
    """Agents answer with the gold number; the programmer writes code that prints it."""
    def respond(agent, inputs, request, rnd):
        gold = gold_of_question(inputs["user_question"])
        if agent == "2":
            return f"```python\nprint({gold})\n```"
        return f"Step by step. The answer is {gold}."
    return respond


def test_math_graph_runs_code_and_scores_against_gold():
    problems = load_gsm8k(limit=2)
    golds = {p.question: p.gold for p in problems}
    wl = math_workload(4)
    graph = build(wl, 4)
    eng = ScriptedEngine(responder=gold_responder(golds.get))
    rec = GraphRunner(graph, wl, eng).run(problems[0], "dense")
    assert [c.agent_name for c in rec.calls] == ["solver", "analyst", "programmer", "inspector", "decision"]
    prog = rec.calls[2]
    assert prog.tool["name"] == "python_executor" and prog.tool["details"]["ok"]
    assert prog.tool["text"] == f"The code ran and printed:\n{problems[0].gold}"
    inspector_inputs = eng.log[3]["inputs"]
    assert inspector_inputs["condition_2_current"] == prog.tool["text"]
    assert rec.prediction == problems[0].gold and rec.correct
    assert rec.shadow_choice is None            # dense runs have no shadow
    assert all(c.path == "dense" and c.call_mode == "dense" for c in rec.calls)


def test_kvcomm_run_has_a_shadow_decision_on_identical_inputs():
    p = load_gsm8k(limit=1)[0]
    wl = math_workload(3)
    eng = ScriptedEngine(warm_after=0)
    rec = GraphRunner(build(wl, 3), wl, eng).run(p, "kvcomm")
    decision, shadow = rec.calls[-2], rec.calls[-1]
    assert decision.is_decision and shadow.is_decision and shadow.shadow
    assert (decision.call_mode, shadow.call_mode) == ("kvcomm", "dense")
    assert eng.log[-1]["inputs"] == eng.log[-2]["inputs"]
    assert decision.inputs_digest == shadow.inputs_digest
    assert rec.judge_choice is not None and rec.shadow_choice is not None


def test_decision_dense_switch_pins_the_judge_and_skips_the_shadow():
    p = load_gsm8k(limit=1)[0]
    wl = math_workload(2)
    eng = ScriptedEngine(warm_after=0)
    rec = GraphRunner(build(wl, 2), wl, eng, decision_dense=True).run(p, "kvcomm")
    assert [c.call_mode for c in rec.calls] == ["kvcomm", "kvcomm", "dense"]
    assert [c.path for c in rec.calls] == ["reuse", "reuse", "dense"]
    assert not any(c.shadow for c in rec.calls)
    assert summarize([rec])["judge_consistency"] == 1.0


def test_max_new_tokens_reach_the_engine():
    p = load_gsm8k(limit=1)[0]
    wl = math_workload(2)
    eng = ScriptedEngine()
    GraphRunner(build(wl, 2), wl, eng, max_new_tokens=17, decision_max_new_tokens=33).run(p, "dense")
    assert [e["max_new_tokens"] for e in eng.log] == [17, 17, 33]


def test_mmlu_question_shows_the_options_and_scores_letters():
    p = load_mmlu("validation", limit=1)[0]
    wl = mmlu_workload(3)
    eng = ScriptedEngine(responder=lambda a, inp, r, k: f"The answer is ({p.gold}).")
    rec = GraphRunner(build(wl, 3), wl, eng).run(p, "dense")
    q = eng.log[0]["inputs"]["user_question"]
    assert q.startswith(p.question) and all(f"({l}) " in q for l in "ABCD")
    assert [c.agent_name for c in rec.calls][-2:] == ["critic", "decision"]
    assert rec.prediction == p.gold and rec.correct


def test_humaneval_test_analyst_runs_the_writers_code_before_its_call():
    p = load_humaneval(limit=1)[0]
    good = "```python\n" + p.extra["prompt"] + p.extra["canonical_solution"] + "```"
    wl = code_workload(3)
    eng = ScriptedEngine(responder=lambda a, inp, r, k: good)
    rec = GraphRunner(build(wl, 3), wl, eng).run(p, "dense")
    analyst = rec.calls[2]
    assert analyst.agent_name == "analyst" and analyst.tool["phase"] == "before"
    cond = eng.log[2]["inputs"]["condition_2_current"]
    assert re.search(r"Python Programmer: 2/2 examples pass", cond)
    assert re.search(r"Algorithm Designer: 2/2 examples pass", cond)
    assert eng.log[3]["inputs"]["condition_2_current"] == cond     # the decision agent sees it
    assert rec.correct                                             # hidden tests pass


def test_run_comparison_runs_warmup_then_measured_in_both_modes():
    problems = load_gsm8k(limit=3)
    wl = math_workload(2)
    eng = ScriptedEngine(warm_after=2)
    runner = GraphRunner(build(wl, 2), wl, eng)
    seen = []
    recs = run_comparison(runner, problems[1:], problems[:1], progress=False, on_record=seen.append)
    assert [(r.question_id, r.mode, r.phase) for r in recs] == [
        (problems[0].id, "dense", "warmup"), (problems[0].id, "kvcomm", "warmup"),
        (problems[1].id, "dense", "measure"), (problems[1].id, "kvcomm", "measure"),
        (problems[2].id, "dense", "measure"), (problems[2].id, "kvcomm", "measure")]
    assert seen == recs
    s = summarize(recs)
    assert s["questions"] == 2 and s["reuse_rate"] == 1.0
    assert summarize(recs, WARMUP)["reuse_rate"] == 0.0
    for name, a in s["agents"].items():
        assert a["speedup"] > 1.0, name
        assert a["calls_dense"] == a["calls_kvcomm"] == 2


def test_unknown_mode_and_missing_engine_are_errors():
    wl = math_workload(1)
    with pytest.raises(ValueError, match="no engine"):
        GraphRunner(build(wl, 1), wl, {"dense": ScriptedEngine()})
    runner = GraphRunner(build(wl, 1), wl, ScriptedEngine())
    with pytest.raises(ValueError, match="mode"):
        runner.run(load_gsm8k(limit=1)[0], "sparse")


def test_an_empty_reply_reaches_downstream_agents_as_a_marker():
    from kvcomm_app.runtime.executor import EMPTY_REPLY
    p = load_gsm8k(limit=1)[0]
    wl = math_workload(2)
    eng = ScriptedEngine(responder=lambda a, inp, r, k: "" if a == "0" else "The answer is 1.")
    rec = GraphRunner(build(wl, 2), wl, eng).run(p, "dense")   # the engine rejects empty inputs
    assert rec.calls[0].text == ""
    assert eng.log[1]["inputs"]["agent_0_current"] == EMPTY_REPLY
