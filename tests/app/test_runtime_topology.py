"""Topologies: execution order, who reads what, templates, rounds — driven through the
graph runner against the scripted engine, which rejects inputs that do not match a
template's placeholders."""
import pytest

from kvcomm_app.runtime.agents import Role, SlotRef, Tool, ToolResult
from kvcomm_app.runtime.datasets import Problem
from kvcomm_app.runtime.executor import NO_HISTORY, GraphRunner
from kvcomm_app.runtime.graph import build_graph
from kvcomm_app.runtime.topology import (Topology, chain, debate, fully_connected, layered, make_topology,
                                     star, topological_order)
from kvcomm_app.runtime.testing import ScriptedEngine
from kvcomm_app.runtime.workloads import Workload


def plain_roles(n):
    return [Role(f"r{i}", f"Role {i}", f"You are role {i}.", f"Answer as role {i}.") for i in range(n)]


def workload(roles):
    return Workload("toy", ("toy",), roles, Role("decision", "Judge", "You judge.", "Decide."),
                    "Question", lambda p: p.question, lambda t, p: t[-3:], lambda a, p: a == p.gold,
                    lambda t, p: t[-3:])


def run_graph(topo, roles=None, **kw):
    roles = roles or plain_roles(topo.n_agents)
    wl = workload(roles)
    graph = build_graph(topo, roles, wl.decision_role, wl.question_label)
    eng = ScriptedEngine(responder=lambda a, inp, req, rnd: f"reply of {a} in round {rnd}")
    runner = GraphRunner(graph, wl, eng, **kw)
    rec = runner.run(Problem("toy", "q1", "What is 2+2?", "4"), "kvcomm")
    return graph, eng, rec


def order_of(eng):
    return [(e["round"], e["agent"]) for e in eng.log]


def test_fully_connected_each_agent_hears_all_before():
    graph, eng, _ = run_graph(fully_connected(4), judge_shadow=False)
    assert order_of(eng) == [(0, "0"), (0, "1"), (0, "2"), (0, "3"), (0, "4")]
    for entry in eng.log[:4]:
        i = int(entry["agent"])
        assert set(entry["inputs"]) == {"user_question"} | {f"agent_{j}_current" for j in range(i)}
        for j in range(i):  # the content is what agent j actually replied
            assert entry["inputs"][f"agent_{j}_current"] == f"reply of {j} in round 0"
        assert entry["inputs"]["user_question"] == "What is 2+2?"
    decision = eng.log[4]["inputs"]
    assert set(decision) == {"user_question"} | {f"agent_{j}_current" for j in range(4)}


def test_chain_hears_only_previous():
    _, eng, _ = run_graph(chain(3), judge_shadow=False)
    assert order_of(eng) == [(0, "0"), (0, "1"), (0, "2"), (0, "3")]
    assert set(eng.log[0]["inputs"]) == {"user_question"}
    assert set(eng.log[1]["inputs"]) == {"user_question", "agent_0_current"}
    assert set(eng.log[2]["inputs"]) == {"user_question", "agent_1_current"}


def test_star_spokes_hear_only_the_hub():
    _, eng, _ = run_graph(star(4), judge_shadow=False)
    assert eng.log[0]["agent"] == "0"
    for entry in eng.log[1:4]:
        assert set(entry["inputs"]) == {"user_question", "agent_0_current"}


def test_layered_hears_previous_layer():
    _, eng, _ = run_graph(layered([2, 1, 2]), judge_shadow=False)
    ins = {e["agent"]: set(e["inputs"]) for e in eng.log}
    assert ins["0"] == ins["1"] == {"user_question"}
    assert ins["2"] == {"user_question", "agent_0_current", "agent_1_current"}
    assert ins["3"] == ins["4"] == {"user_question", "agent_2_current"}
    assert ins["5"] == {"user_question"} | {f"agent_{j}_current" for j in range(5)}


def test_debate_rounds_use_history():
    graph, eng, rec = run_graph(debate(3, rounds=3), judge_shadow=False)
    assert order_of(eng) == [(r, str(i)) for r in range(3) for i in range(3)] + [(2, "3")]
    for entry in eng.log[:9]:
        rnd = entry["round"]
        assert set(entry["inputs"]) == {"user_question"} | {f"agent_{j}_history" for j in range(3)}
        for j in range(3):
            want = NO_HISTORY if rnd == 0 else f"reply of {j} in round {rnd - 1}"
            assert entry["inputs"][f"agent_{j}_history"] == want
    assert eng.log[9]["inputs"]["agent_1_current"] == "reply of 1 in round 2"
    assert [c.round for c in rec.calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_topological_order_is_not_just_node_order():
    topo = Topology("custom", 4, 1, {0: (2,), 1: (0,), 3: (1, 2)})
    assert topological_order(topo) == [2, 0, 1, 3]
    _, eng, _ = run_graph(topo, judge_shadow=False)
    assert [e["agent"] for e in eng.log] == ["2", "0", "1", "3", "4"]


def test_cycles_and_bad_indices_are_rejected():
    with pytest.raises(ValueError, match="cycle"):
        Topology("loop", 3, 1, {0: (2,), 1: (0,), 2: (1,)})
    with pytest.raises(ValueError, match="outside"):
        Topology("bad", 2, 1, {1: (5,)})
    with pytest.raises(ValueError, match="own current"):
        Topology("self", 2, 1, {1: (1,)})
    with pytest.raises(ValueError, match="2 rounds"):
        debate(3, rounds=1)
    with pytest.raises(ValueError, match="unknown topology"):
        make_topology("ring", 3)
    with pytest.raises(ValueError, match="add up"):
        make_topology("layered", 4, layers=[1, 2])


def test_templates_hold_exactly_the_read_placeholders():
    topo = fully_connected(3)
    graph = build_graph(topo, plain_roles(3), Role("decision", "Judge", "J.", "Decide."))
    for agent in graph.all_agents:
        for slot in agent.reads:
            assert agent.template.count("{" + slot.placeholder + "}") == 1
        assert agent.template.count("{") == len(agent.reads)
        assert agent.template.rstrip().endswith(agent.role.instruction)
    assert [a.name for a in graph.all_agents] == ["r0", "r1", "r2", "decision"]


def test_tool_conditions_flow_downstream_and_before_tools_feed_the_owner():
    seen = []

    def after(ctx):
        seen.append(("after", ctx.agent_id, ctx.reply))
        return ToolResult(f"ran code of {ctx.agent_id}")

    def before(ctx):
        seen.append(("before", ctx.agent_id, dict(ctx.upstream)))
        return ToolResult("tests: 1/2 pass")

    roles = plain_roles(3)
    roles[0] = Role("coder", "Coder", "You code.", "Write code.", tool=Tool("exec", "after", after))
    roles[2] = Role("tester", "Tester", "You test.", "Report.", tool=Tool("tests", "before", before))
    graph, eng, rec = run_graph(fully_connected(3), roles, judge_shadow=False)
    ins = {e["agent"]: e["inputs"] for e in eng.log}
    assert seen[0] == ("after", "0", "reply of 0 in round 0")
    assert seen[1] == ("before", "2", {"0": "reply of 0 in round 0", "1": "reply of 1 in round 0"})
    assert ins["1"]["condition_0_current"] == "ran code of 0"
    assert ins["2"]["condition_0_current"] == "ran code of 0"
    assert ins["2"]["condition_2_current"] == "tests: 1/2 pass"
    assert ins["3"]["condition_2_current"] == "tests: 1/2 pass"   # the decision agent too
    assert "condition_2_current" not in ins["1"]
    assert rec.calls[0].tool["text"] == "ran code of 0"


def test_slot_ref_validation():
    assert SlotRef("current", "3").placeholder == "agent_3_current"
    assert SlotRef("history", "0").placeholder == "agent_0_history"
    assert SlotRef("condition", "2").placeholder == "condition_2_current"
    with pytest.raises(ValueError):
        SlotRef("current")
    with pytest.raises(ValueError):
        SlotRef("bogus", "1")
    with pytest.raises(ValueError, match="braces"):
        Role("x", "X", "Put it in \\boxed{}", "go")
