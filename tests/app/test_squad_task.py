"""The passage task: SQuAD questions with their passages as one retrieved, shared slot."""
from __future__ import annotations

import pytest

from kvcomm_app.runtime.answers import best_em, best_f1, extract_span, normalize_span, span_f1
from kvcomm_app.runtime.datasets import load_squad
from kvcomm_app.runtime.graph import build_graph
from kvcomm_app.runtime.topology import make_topology
from kvcomm_app.runtime.workloads import make_workload


def test_squad_loads_questions_passages_and_answers():
    ps = load_squad(limit=5)
    assert len(ps) == 5 and len(load_squad()) == 1000
    for p in ps:
        assert p.task == "squad" and p.question.endswith("?") or p.question
        assert len(p.extra["passage"]) > 100 and p.extra["answers"] and p.gold == p.extra["answers"][0]
        assert "Question:" not in p.extra["passage"] and "Background:" not in p.extra["passage"]


@pytest.mark.parametrize("reply, span", [
    ("23 years", "23 years"),
    ("Answer: 23 years.", "23 years"),
    ("The answer is: Saint Bernadette Soubirous. She was", "Saint Bernadette Soubirous"),
    ("\"Denver Broncos\"\nThey won.", "Denver Broncos"),
    ("", None),
])
def test_extract_span(reply, span):
    assert extract_span(reply) == span


def test_official_normalisation_em_and_f1():
    assert normalize_span("The  Denver Broncos!") == "denver broncos"
    assert best_em("the Broncos", ["Denver Broncos", "Broncos"])
    assert not best_em(None, ["x"])
    assert span_f1("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    assert best_f1("in 1858", ["1858", "March 1858"]) == pytest.approx(2 / 3)
    assert best_f1("", ["x"]) == 0.0


def test_every_agent_reads_the_one_retrieved_passage():
    w = make_workload("squad", 3)
    g = build_graph(make_topology("fully_connected", 3), w.roles, w.decision_role, w.question_label)
    slot = "condition_0_current"
    for a in g.all_agents:
        assert slot in a.placeholders and "Retrieved passage:" in a.template
    p = load_squad(limit=1)[0]
    from kvcomm_app.runtime.agents import ToolContext
    res = g.agents[0].tool.run(ToolContext(p, "0", None, {}, 0))
    assert p.extra["passage"] in res.text
    assert w.score("23 years", p) == best_em("23 years", p.extra["answers"])
    assert w.partial_score("23", p) == pytest.approx(1.0)


def test_squad_eval_runs_through_the_cli_with_f1(tmp_path, capsys):
    import json

    from kvcomm_app import cli
    from kvcomm_app.runtime.testing import ScriptedEngine

    out = tmp_path / "squad.json"
    args = cli.build_parser().parse_args(["eval", "--task", "squad", "--agents", "3", "--questions", "2",
                                          "--warmup", "1", "--no-progress", "--json", str(out)])
    assert cli.cmd_eval(args, engine_factory=lambda cfg: (ScriptedEngine(), "scripted", "cpu", 0.0)) == 0
    doc = json.loads(out.read_text())
    assert doc["questions"] == 2 and [a["name"] for a in doc["agents"]][-1] == "decision"
