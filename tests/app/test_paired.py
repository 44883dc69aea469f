"""Teacher-forced paired evaluation (kvcomm_app.runtime.paired) and its metrics."""
from __future__ import annotations

import math

import pytest
import torch

from kvcomm_app.runtime import fidelity
from kvcomm_app.runtime.paired import compare_logits
from kvcomm_app.runtime.records import CallRecord


def test_compare_logits_agreement_and_kl():
    d = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.1, 0.0]])
    same = compare_logits(d, d.clone())
    assert same["first_agree"] and same["tf_agree"] == 3 and same["tf_positions"] == 3
    assert same["first_kl"] == pytest.approx(0.0, abs=1e-7) and same["tf_kl"] == pytest.approx(0.0, abs=1e-7)
    k = d.clone()
    k[2] = torch.tensor([1.1, 1.0, 0.0])            # the near-tie flips on the last row
    got = compare_logits(d, k[:2].clone() if False else k)
    assert got["first_agree"] and got["tf_agree"] == 2
    p, q = torch.softmax(d[2], 0), torch.softmax(k[2], 0)
    assert got["tf_kl"] == pytest.approx(float((p * (p / q).log()).sum()) / 3, rel=1e-5)
    short = compare_logits(d, k[:1])                 # a shorter side: compare what both have
    assert short["tf_positions"] == 1


def test_wilson_interval():
    assert fidelity.wilson(0, 0) is None
    lo, hi = fidelity.wilson(98, 100)
    assert lo == pytest.approx(0.9300, abs=1e-3) and hi == pytest.approx(0.9945, abs=1e-3)
    lo, hi = fidelity.wilson(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73


def _call(agent, path, agree, kl, tf, n, kinds, anchors, s0=10, T=100, computed=5, encoded=0):
    c = CallRecord(question_id="q", mode="paired", phase="measure", round=0, agent_id=agent, agent_name=agent,
                   role=agent, call_mode="kvcomm", path=path, reason="", ttft_ms=1.0, text="", inputs_digest="d",
                   prompt_tokens=T, s0_tokens=s0, computed_tokens=computed, encoded_tokens=encoded,
                   slot_kinds=kinds, slot_anchors=anchors)
    c.fidelity = {"first_agree": agree, "first_kl": kl, "tf_agree": tf, "tf_positions": n, "tf_kl": kl / 2}
    return c


def test_summary_breakdowns_and_token_reuse():
    calls = [
        _call("a", "reuse", True, 0.01, 30, 32, {"user_question": "question"}, {"user_question": [1, 2]}),
        _call("b", "partial", False, 0.09, 28, 32, {"user_question": "question", "agent_0_current": "reply"},
              {"user_question": [1, 2, 3, 4, 5, 6, 7]}, computed=40, encoded=20),
        _call("b", "dense", True, 0.0, 32, 32, {"agent_0_current": "reply"}, {}, computed=90),
    ]
    s = fidelity.summary(calls)
    assert s["calls"] == 2                                   # dense-path calls are not reuse fidelity
    assert s["first_token_agreement"]["rate"] == 0.5 and s["first_token_agreement"]["n"] == 2
    assert s["first_token_kl"] == pytest.approx(0.05)
    assert s["tf32_agreement"]["k"] == 58 and s["tf32_agreement"]["n"] == 64
    # token reuse over every call: (90 + 90 + 90) after S0, (5 + 40 + 90) computed, 20 encoded
    assert s["token_reuse"]["rate"] == pytest.approx(1 - 135 / 270)
    assert s["token_reuse_with_encoding"]["rate"] == pytest.approx(1 - 155 / 270)
    assert s["paths"] == {"reuse": 1, "partial": 1, "dense": 1}
    kinds = fidelity.by_slot_kind(calls)
    assert kinds["question"]["calls"] == 2 and kinds["reply"]["calls"] == 1
    anchors = fidelity.by_anchors(calls)
    assert list(anchors) == ["none", "2", "6+"]


def test_paired_replay_of_a_real_engine_is_exact_on_dense_path_calls(tiny):
    """A cold pool: every paired call computes its slots (the dense path after the exact S0),
    so it must agree with its dense twin everywhere (KL ~ 0); after warm-up, reuse calls are
    measured and differ a little."""
    import kvcomm
    from kvcomm.engine import KVCommEngine
    from kvcomm_app.runtime.session import ExperimentConfig, run_experiment

    model, tok = tiny("llama")

    def factory(cfg):
        spec = kvcomm.hf.inspect_model(model)
        pool = kvcomm.PoolConfig(layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim)
        return KVCommEngine(model, tok, pool_config=pool), "tiny", "cpu", 0.0

    cfg = ExperimentConfig(task="gsm8k", n_agents=2, questions=2, warmup=2, max_new_tokens=6, gate=False,
                           paired=True, paired_positions=4, progress=False)
    res = run_experiment(cfg, engine_factory=factory, log=lambda *_: None)
    paired = [c for q in res.records if q.mode == "paired" for c in q.calls]
    dense = [c for q in res.records if q.mode == "dense" for c in q.calls]
    assert len(paired) == len(dense) and all(c.fidelity for c in paired)
    cold = [c for c in paired if c.path == "dense"]
    assert cold, "a cold pool computes its first contents"
    for c in cold:
        assert c.fidelity["first_agree"] and c.fidelity["first_kl"] < 1e-6 and c.fidelity["tf_kl"] < 1e-6
    warm = [c for c in paired if c.path in ("reuse", "partial")]
    assert warm, "after two warm-up questions some calls reuse"
    assert any(c.fidelity["first_kl"] > 1e-8 for c in warm)
    f = res.summary["fidelity"]
    assert f is not None and f["calls"] == sum(1 for c in warm if c.phase == "measure")
    assert set(f["agents"]) <= {c.agent_name for c in paired}
    assert math.isfinite(f["first_token_kl"])


def test_paired_variants_replay_the_same_dense_run_with_their_own_settings(tiny):
    """--paired-variant: each variant replays the one dense run on its own engine and pool;
    its result has the variant's settings and its own paired calls, the dense records are
    shared, and min_anchors=8 keeps every slot collecting anchors (no reuse in a short run)."""
    import kvcomm
    from kvcomm.engine import KVCommEngine
    from kvcomm_app.cli_checks import parse_variant
    from kvcomm_app.runtime.session import ExperimentConfig, run_experiment

    model, tok = tiny("llama")

    def factory(cfg):
        spec = kvcomm.hf.inspect_model(model)
        pool = kvcomm.PoolConfig(layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim)
        return KVCommEngine(model, tok, pool_config=pool), "tiny", "cpu", 0.0

    variants = [(s, parse_variant(s)) for s in ("min_anchors=8", "recompute=segments partial=off")]
    cfg = ExperimentConfig(task="gsm8k", n_agents=2, questions=2, warmup=2, max_new_tokens=6, gate=False,
                           paired=True, paired_positions=4, progress=False, free=False, variants=variants)
    res = run_experiment(cfg, engine_factory=factory, log=lambda *_: None)
    assert {r.variant for r in res.records} == {None}
    assert [v.config.pool.get("min_anchors") for v in res.variants] == [8, None]
    assert res.variants[1].config.recompute == "segments" and res.variants[1].config.partial is False
    dense_ids = [id(r) for r in res.records if r.mode == "dense"]
    for (label, _), v in zip(variants, res.variants):
        assert [id(r) for r in v.records if r.mode == "dense"] == dense_ids
        paired = [q for q in v.records if q.mode == "paired"]
        assert len(paired) == len(dense_ids) and all(q.variant == label for q in paired)
    m8 = [c for q in res.variants[0].records if q.mode == "paired" for c in q.calls]
    assert m8 and all(c.path in ("dense", "partial") for c in m8), "8 anchors are never reached in 4 questions"
    own = [c for q in res.records if q.mode == "paired" for c in q.calls]
    assert any(c.path in ("reuse", "partial") for c in own)
    nopartial = [c for q in res.variants[1].records if q.mode == "paired" for c in q.calls]
    assert all(c.path in ("reuse", "dense") for c in nopartial)
    # Each fidelity entry records the pool its own replay engine ended with.
    from kvcomm_app.runtime.fidelity_report import fidelity_entry
    for r in [res] + res.variants:
        last = [q for q in r.records if q.mode == "paired"][-1]
        assert fidelity_entry(r, command="test", commit=None)["final_pool"] == {
            "anchors": last.pool_size, "bytes": last.pool_bytes}
    def final(r):
        return [q for q in r.records if q.mode == "paired"][-1].pool_size

    assert final(res.variants[0]) > final(res), "min_anchors=8 keeps more anchors than the default"


def test_parse_variant_names_what_is_wrong():
    from kvcomm_app.cli_checks import UsageError, parse_variant

    assert parse_variant("min_anchors=6 recompute=segments,budget=0.1 partial=off") == {
        "min_anchors": 6, "recompute": "segments,budget=0.1", "partial": False}
    assert parse_variant("storage=int8 byte_budget=128M") == {"storage": "int8", "byte_budget": 128 << 20}
    for bad, needle in [("min_anchors=1", "at least 2"), ("colour=red", "unknown setting 'colour'"),
                        ("recompute=everything", "unknown part"), ("partial=maybe", "on or off"),
                        ("gamma", "not KEY=VALUE"), ("", "no settings"),
                        ("storage=int4", "storage 'int4' is not an anchor storage"),
                        ("byte_budget=big", "byte_budget 'big' is not a size in bytes")]:
        with pytest.raises(UsageError, match=needle):
            parse_variant(bad)
