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
