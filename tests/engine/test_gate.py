"""The correctness gate: a model where reuse works passes; a model whose reuse path is
broken is refused, and after gate.apply every kvcomm call runs dense with the gate's
reason (AgentCall, runtime metrics, the engine's reuse_refusal); the probe runs once per
model. The gate drives the engine through its public API only (call(keep_cache=True),
refuse_reuse).

Tiny random Llamas with gamma=1 (tiny KV makes the entropy gate refuse sharing at the
default gamma, see test_default_gamma_on_a_tiny_model_is_inconclusive). The KV error
bound is off here: random weights make context matter far more than in a trained
model (relative KV error ~0.5 vs ~0.1 for SmolLM2), and these tests are about the
first-token criterion and the plumbing.
"""
from __future__ import annotations

import os

import pytest
import torch

import kvcomm
from kvcomm.engine import KVCommEngine
from kvcomm.plan.planner import Planner
from kvcomm.engine import gate
from kvcomm.models import random_model
from kvcomm_app.runtime import metrics

FAST = dict(probes=4, warmup=2, min_pairs=4, reply_tokens=4, disk_cache=False, max_kv_error=None)
SOLVER = ("You solve problems.", "Problem:\n{user_question}\n\nSolve it.")
CHECKER = ("You check solutions.", "Problem:\n{user_question}\n\nSolution:\n{agent_solver_current}\n\nIs it right?")


@pytest.fixture(autouse=True)
def _fresh_gate_cache(monkeypatch, tmp_path):
    gate.clear_memory_cache()
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path / "cache"))
    yield
    gate.clear_memory_cache()


@pytest.fixture
def probes(monkeypatch):
    """Counts real probe runs."""
    count = {"n": 0}
    real = gate.run_probe

    def counted(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(gate, "run_probe", counted)
    return count


def gate_cfg(**kw) -> gate.GateConfig:
    return gate.GateConfig(**{**FAST, **kw})


def make_engine(model, tok, gamma=1.0):
    eng = KVCommEngine(model, tok, kvcomm.PoolConfig(gamma=gamma))
    eng.add_agent("solver", *SOLVER)
    eng.add_agent("checker", *CHECKER)
    return eng


def run_requests(eng, questions, max_new_tokens=4):
    calls = []
    for q in questions:
        eng.new_request()
        a = eng.call("solver", {"user_question": q}, max_new_tokens=max_new_tokens)
        reply = a.text if a.text.strip() else "(no reply)"
        b = eng.call("checker", {"user_question": q, "agent_solver_current": reply}, max_new_tokens=1)
        calls += [a, b]
    return calls


QUESTIONS = gate.probe_questions(5, seed=7, long=True) + gate.probe_questions(3, seed=8, long=False)


def test_reuse_that_works_passes_and_the_engine_reuses(tiny, probes):
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    res = gate.apply(eng, gate_cfg())
    assert res.allowed, res.reason
    assert eng.reuse_refusal is None
    assert res.reason.startswith("correctness gate: passed")
    assert res.pairs >= FAST["min_pairs"] and res.agreement >= 0.9
    assert 0 < res.kv_error < 1.0 and res.source == "probe" and res.seconds > 0
    assert eng.pool.size() == 0   # the probe used its own pool
    calls = run_requests(eng, QUESTIONS)
    assert any(c.path == "reuse" for c in calls)
    assert not any(c.reason.startswith(gate.REASON_PREFIX) for c in calls)
    assert probes["n"] == 1


def _assert_all_dense_with(calls, reason):
    assert calls
    for c in calls:
        assert c.mode == "kvcomm" and c.path == "dense"
        assert c.reason == reason
        assert c.slot_decisions == {}


def test_unreachable_threshold_refuses_and_every_call_runs_dense(tiny):
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    res = gate.apply(eng, gate_cfg(threshold=1.01))
    calls = run_requests(eng, QUESTIONS)
    assert not res.allowed and eng.reuse_refusal == res.reason
    assert res.reason == f"correctness gate: agreement {res.agreement:.2f} < 1.01 on {res.pairs} probe call(s)"
    _assert_all_dense_with(calls, res.reason)
    assert eng.pool.size() == 0 and eng.pool.memory_bytes() == 0   # refused: the pool is never used
    st = eng.stats()
    assert st["calls"]["reuse"] == 0 and st["calls"]["dense"] == len(calls)


def test_refused_calls_give_the_dense_answer(tiny):
    """Refused kvcomm calls are real dense prefills: same first token and logits as mode=dense."""
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    gate.apply(eng, gate_cfg(threshold=1.01))
    eng.new_request()
    q = {"user_question": QUESTIONS[0]}
    kv = eng.call("solver", q, max_new_tokens=3, return_first_logits=True)
    dense = eng.call("solver", q, mode="dense", max_new_tokens=3, return_first_logits=True)
    assert kv.path == "dense" and kv.reason.startswith("correctness gate")
    assert kv.token_ids == dense.token_ids
    torch.testing.assert_close(kv.first_logits, dense.first_logits, rtol=1e-4, atol=1e-4)


def test_garbage_estimates_are_refused(tiny, monkeypatch):
    """A deliberately broken reuse path: every estimated slot and segment is overwritten
    with noise of the real KV's scale. The probe must catch it."""
    model, tok = tiny("llama")
    real_assemble = Planner.assemble   # the planner's step every backend calls

    def broken(self, plan, k, v):
        out = real_assemble(self, plan, k, v)
        lay = plan.layout
        a, b = lay.spans[0][1], lay.length - 1
        g = torch.Generator().manual_seed(0)
        for t in (k, v):
            region = t[1:, :, a:b]
            region.copy_(torch.randn(region.shape, generator=g) * region.std() * 3)
        return out

    monkeypatch.setattr(Planner, "assemble", broken)
    eng = make_engine(model, tok)
    res = gate.apply(eng, gate_cfg(max_kv_error=1.0))
    assert not res.allowed, res.reason
    assert res.pairs >= FAST["min_pairs"]
    assert res.kv_error > 1.0 or res.agreement < 0.9
    assert res.reason.startswith("correctness gate: ")
    calls = run_requests(eng, QUESTIONS[:3])
    _assert_all_dense_with(calls, res.reason)


def test_default_gamma_on_a_tiny_model_is_inconclusive(tiny):
    """Too few reuse-path probe calls is not a pass: the gate refuses what it did not measure."""
    model, tok = tiny("llama")
    res = gate.check(make_engine(model, tok, gamma=0.3), gate_cfg())
    assert not res.allowed
    assert "inconclusive" in res.reason and f"need {FAST['min_pairs']}" in res.reason


def test_the_probe_runs_once_per_model(probes, tmp_path):
    model, tok = random_model("llama", seed=3)
    first = gate.check(make_engine(model, tok), gate_cfg())
    again = gate.check(make_engine(model, tok), gate_cfg())   # another engine, same model: memory
    assert probes["n"] == 1
    assert again.source == "memory" and again.seconds == 0
    assert (again.allowed, again.agreement, again.key) == (first.allowed, first.agreement, first.key)
    # Another gate setting is another question: probed anew.
    gate.check(make_engine(model, tok), gate_cfg(threshold=0.5))
    assert probes["n"] == 2
    # A changed weight is another model.
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.mul_(1.5)
    changed = gate.check(make_engine(model, tok), gate_cfg())
    assert probes["n"] == 3 and changed.key != first.key


def test_disk_cache_survives_a_restart(probes):
    model, tok = random_model("llama", seed=4)
    first = gate.check(make_engine(model, tok), gate_cfg(disk_cache=True))
    assert probes["n"] == 1
    gate.clear_memory_cache()   # as in a new process
    again = gate.check(make_engine(model, tok), gate_cfg(disk_cache=True))
    assert probes["n"] == 1 and again.source == "disk"
    assert (again.allowed, again.reason, again.agreement) == (first.allowed, first.reason, first.agreement)
    # A damaged cache file is ignored (probed again), never trusted.
    path = gate._disk_path(first.key)
    with open(path, "w") as f:
        f.write("{not json")
    gate.clear_memory_cache()
    assert gate.check(make_engine(model, tok), gate_cfg(disk_cache=True)).source == "probe"
    assert probes["n"] == 2


def test_the_engine_never_probes_and_check_changes_nothing(tiny, probes):
    """The engine alone runs no gate (it does not import it); check() only measures,
    apply() is what sets the refusal."""
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    assert eng.reuse_refusal is None
    eng.new_request()
    eng.call("solver", {"user_question": "What is 1 + 1?"}, max_new_tokens=1)
    eng.call("solver", {"user_question": "What is 1 + 1?"}, mode="dense", max_new_tokens=1)
    assert probes["n"] == 0
    res = gate.check(eng, gate_cfg(threshold=1.01))
    assert not res.allowed and eng.reuse_refusal is None and probes["n"] == 1
    gate.apply(eng, gate_cfg(threshold=1.01))          # from memory: no second probe
    assert eng.reuse_refusal == res.reason and probes["n"] == 1


def test_refuse_reuse_is_public_and_can_be_lifted(tiny):
    """refuse_reuse(reason): kvcomm calls run dense with that reason and leave the pool
    alone; refuse_reuse(None) lets them share again."""
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    eng.refuse_reuse("maintenance: reuse off")
    calls = run_requests(eng, QUESTIONS[:3])
    _assert_all_dense_with(calls, "maintenance: reuse off")
    assert eng.pool.size() == 0 and eng.request.current == {}   # no anchors, no captured replies
    eng.refuse_reuse(None)
    assert eng.reuse_refusal is None
    calls = run_requests(eng, QUESTIONS)
    assert eng.pool.size() > 0 and any(c.path == "reuse" for c in calls)
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        eng.refuse_reuse("  ")


def test_gate_config_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        gate.GateConfig(threshold=1.5)
    with pytest.raises(ValueError, match="warmup >= 2"):
        gate.GateConfig(warmup=1)
    with pytest.raises(ValueError, match="tie_ratio"):
        gate.GateConfig(tie_ratio=0)


def _details(agrees, kv=0.1):
    return [{"agree": a, "top1": a, "kv_error": kv} for a in agrees]


def test_judge_boundaries():
    cfg = gate.GateConfig(threshold=0.75, min_pairs=4, max_kv_error=0.5)
    assert gate.judge(_details([1, 1, 1, 0]), 4, cfg, "k", 0.0).allowed          # 0.75 >= 0.75
    low = gate.judge(_details([1, 1, 0, 0]), 4, cfg, "k", 0.0)
    assert not low.allowed and low.reason == "correctness gate: agreement 0.50 < 0.75 on 4 probe call(s)"
    few = gate.judge(_details([1, 1, 1]), 8, cfg, "k", 0.0)
    assert not few.allowed and "only 3 of 8 probe calls took the reuse path (need 4)" in few.reason
    far = gate.judge(_details([1, 1, 1, 1], kv=0.8), 4, cfg, "k", 0.0)
    assert not far.allowed and far.reason == "correctness gate: KV error 0.800 > 0.500 on 4 probe call(s)"


def test_runtime_metrics_count_gate_refusals(tiny):
    """The refusal shows in the runtime summary of a real graph run."""
    from kvcomm_app.runtime.executor import GraphRunner
    from kvcomm_app.runtime.graph import build_graph
    from kvcomm_app.runtime.records import KVCOMM, MEASURE
    from kvcomm_app.runtime.datasets import Problem
    from kvcomm_app.runtime.topology import make_topology
    from kvcomm_app.runtime.workloads import make_workload

    assert metrics.GATE_REASON == gate.REASON_PREFIX
    model, tok = tiny("llama")
    eng = KVCommEngine(model, tok, kvcomm.PoolConfig(gamma=1.0))
    gate.apply(eng, gate_cfg(threshold=1.01))
    wl = make_workload("gsm8k", 2)
    graph = build_graph(make_topology("chain", 2), wl.roles, wl.decision_role, wl.question_label)
    runner = GraphRunner(graph, wl, eng, max_new_tokens=3, judge_shadow=False)
    recs = [runner.run(Problem("gsm8k", f"p{i}", q, "0"), KVCOMM, MEASURE) for i, q in enumerate(QUESTIONS[:2])]
    summary = metrics.summarize(recs)
    n_calls = sum(len(r.calls) for r in recs)
    assert summary["gate_refused_calls"] == n_calls == 6
    assert summary["reuse_rate"] == 0.0


def test_a_probe_that_fails_refuses_reuse(tiny, monkeypatch):
    """An exception inside the probe is no evidence that reuse works: refused, with the
    error in the reason, and the user's calls still run (dense)."""
    model, tok = tiny("llama")

    def boom(*a, **k):
        raise RuntimeError("estimate kernel exploded\nsecond line")

    monkeypatch.setattr(Planner, "assemble", boom)
    eng = make_engine(model, tok)
    res = gate.apply(eng, gate_cfg(disk_cache=True))
    calls = run_requests(eng, QUESTIONS[:2])
    assert not res.allowed
    assert res.reason == "correctness gate: probe failed: RuntimeError: estimate kernel exploded"
    _assert_all_dense_with(calls, res.reason)
    assert not os.path.exists(gate._disk_path(res.key))


def test_session_reports_the_gate(tiny):
    """run_experiment (what `kvcomm demo` runs) logs the gate's verdict, keeps it in the
    result and counts the refused calls in the summary."""
    pytest.importorskip("kvcomm_app.runtime.datasets")
    from kvcomm_app.runtime.datasets import DataNotInstalled
    from kvcomm_app.runtime.session import ExperimentConfig, run_experiment

    model, tok = tiny("llama")
    cfg = ExperimentConfig(questions=1, warmup=0, max_new_tokens=3, progress=False, judge_shadow=False,
                           gate=gate_cfg(threshold=1.01))
    eng = KVCommEngine(model, tok, kvcomm.PoolConfig(gamma=1.0))
    lines = []
    try:
        res = run_experiment(cfg, engine_factory=lambda c: (eng, "tiny", "cpu", 0.0), log=lines.append)
    except DataNotInstalled as e:
        pytest.skip(str(e))
    assert res.gate is not None and res.gate["allowed"] is False
    assert any(line.startswith("correctness gate: agreement") and "every KVCOMM call runs dense" in line
               for line in lines), lines
    assert res.summary["gate_refused_calls"] == 5 and res.summary["reuse_rate"] == 0.0
    assert res.engine_stats["gate"]["reason"] == res.gate["reason"]
