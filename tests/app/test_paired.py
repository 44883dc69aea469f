"""Teacher-forced paired evaluation (kvcomm_app.runtime.paired) and its metrics."""
from __future__ import annotations

import json
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
    # token reuse over every call: (90 + 90 + 90) after S0, (5 + 40 + 90) computed, 20 encoded;
    # the headline counts every token the model ran, the other figure leaves encodings out
    assert s["token_reuse"]["rate"] == pytest.approx(1 - 155 / 270)
    assert s["token_reuse_excluding_encodings"]["rate"] == pytest.approx(1 - 135 / 270)
    assert s["compute"] == {"prompt": 135, "encodings": 20, "probe": 0.0, "share": pytest.approx(155 / 270)}
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
    assert parse_variant("head_share=0") == {"head_share": 0.0}
    assert parse_variant("estimate_anchors=4") == {"estimate_anchors": 4}
    for bad, needle in [("min_anchors=1", "at least 2"), ("colour=red", "unknown setting 'colour'"),
                        ("recompute=everything", "unknown part"), ("partial=maybe", "on or off"),
                        ("gamma", "not KEY=VALUE"), ("", "no settings"),
                        ("storage=int4", "storage 'int4' is not an anchor storage"),
                        ("byte_budget=big", "byte_budget 'big' is not a size in bytes"),
                        ("head_share=2", "head_share must be a fraction"), ("head_share=x", "head_share must be"),
                        ("estimate_anchors=-1", "estimate_anchors must be an int")]:
        with pytest.raises(UsageError, match=needle):
            parse_variant(bad)


# ------------------------------------------------------------------ intervals, paths, charged TTFT


def _q(qid, agent, path, agree, **kw):
    c = _call(agent, path, agree, 0.02, 30 if agree else 20, 32, {"user_question": "question"}, {"user_question": [1]},
              **kw)
    c.question_id = qid
    return c


def test_intervals_resample_questions_not_calls():
    """When a question decides all of its calls (every call of a question agrees, or none
    does), calls are not independent: the bootstrap over questions is much wider than a
    Wilson interval over calls; seeded, it is reproducible."""
    calls = [_q(f"q{i}", f"a{j}", "reuse", i % 2 == 0) for i in range(10) for j in range(10)]
    s = fidelity.summary(calls)
    lo, hi = s["first_token_agreement"]["ci95"]
    wlo, whi = fidelity.wilson(50, 100)
    assert s["first_token_agreement"]["rate"] == 0.5
    assert hi - lo > 2 * (whi - wlo) and lo < 0.25 and hi > 0.75
    assert fidelity.summary(calls)["first_token_agreement"]["ci95"] == [lo, hi]
    # the same 50/50 mixed inside every question: close to the Wilson width
    mixed = [_q(f"q{i}", f"a{j}", "reuse", j % 2 == 0) for i in range(10) for j in range(10)]
    mlo, mhi = fidelity.summary(mixed)["first_token_agreement"]["ci95"]
    assert mhi - mlo < 0.1
    # token reuse: calls of a question share its path, so its interval is over questions too
    tok = [_q(f"q{i}", "a", "reuse" if i < 5 else "partial", True, computed=1 if i < 5 else 60) for i in range(10)]
    t = fidelity.summary(tok)["token_reuse"]
    assert t["ci"] == "bootstrap over questions" and t["ci95"][1] - t["ci95"][0] > 0.3
    assert fidelity.bootstrap_ratios([{"x": (1.0, 2.0)}]) == {"x": None}   # one question: no interval



def test_bootstrap_interval_resamples_whole_groups():
    from kvcomm_app.bench.vllm_serve import _speedup
    # every pair 2x: the interval of the median ratio collapses on 2
    same = [[(200.0 + i, 100.0 + i / 2)] for i in range(8)]
    assert fidelity.bootstrap_interval(same, _speedup) == [2.0, 2.0]
    # parity with noise: the interval straddles 1 (no measurable slowdown or gain)
    noisy = [[(300.0 + d, 300.0 - d)] for d in (-40, -25, -10, -5, 5, 10, 25, 40)]
    lo, hi = fidelity.bootstrap_interval(noisy, _speedup)
    assert lo < 1.0 < hi
    assert fidelity.bootstrap_interval(noisy, _speedup) == [lo, hi]   # seeded: repeatable
    # a group's members stay together: two groups, each one member of the mean 0 / 10
    assert fidelity.bootstrap_interval([[0.0, 0.0], [10.0, 10.0]], lambda m: sum(m) / len(m)) == [0.0, 10.0]
    assert fidelity.bootstrap_interval([[1.0]], lambda m: m[0]) is None              # one group: no interval
    assert fidelity.bootstrap_interval([[1.0], [2.0]], lambda m: None) is None       # nothing scored


def test_fidelity_by_path():
    calls = [_q("q1", "a", "reuse", True), _q("q1", "b", "partial", False), _q("q2", "a", "reuse", True),
             _q("q2", "b", "dense", True)]
    paths = fidelity.by_path(calls)
    assert list(paths) == ["reuse", "partial", "dense"]
    assert paths["reuse"]["first_token_agreement"]["rate"] == 1.0 and paths["reuse"]["calls"] == 2
    assert paths["partial"]["first_token_agreement"]["rate"] == 0.0
    assert paths["dense"]["calls"] == 0 and paths["dense"]["kvcomm_calls"] == 1


def test_capture_and_later_encodings_are_charged_to_the_first_reader():
    from kvcomm_app.runtime import metrics

    def rec(agent, kinds, ttft, mode="paired", **timings):
        c = _call(agent, "reuse", True, 0.0, 1, 1, kinds, {})
        c.agent_id, c.mode, c.ttft_ms, c.timings = agent, mode, ttft, dict(timings)
        return c

    a = rec("0", {"user_question": "question"}, 100.0, capture=12.0, encode_after=30.0)
    b = rec("1", {"user_question": "question", "agent_0_current": "reply"}, 20.0, capture=5.0)
    c = rec("2", {"user_question": "question", "agent_0_current": "reply", "agent_1_current": "reply"}, 25.0)
    d = rec("3", {"agent_0_history": "reply"}, 7.0)
    got = metrics.charged_ttft([a, b, c, d])
    # b is the first to read agent 0's reply and the question a encoded after its first token
    assert got[id(a)] == 100.0 and got[id(b)] == 20.0 + 12.0 + 30.0
    assert got[id(c)] == 25.0 + 5.0 and got[id(d)] == 7.0   # each charge paid once
    # another question (or mode) starts clean
    e = rec("1", {"agent_0_current": "reply"}, 20.0)
    e.question_id = "other"
    assert metrics.charged_ttft([a, e])[id(e)] == 20.0


def test_ttft_is_timed_on_the_paired_replays_against_the_prefix_baseline():
    from kvcomm_app.runtime import metrics

    def rec(mode, ttft, prefix=None, path="reuse", **timings):
        c = _call("0", path, True, 0.0, 1, 1, {"user_question": "question"}, {})
        c.mode, c.ttft_ms, c.prefix_ttft_ms, c.timings = mode, ttft, prefix, dict(timings)
        return c

    calls = [rec("dense", 400.0), rec("kvcomm", 10.0), rec("paired", 50.0, prefix=300.0)]
    a = metrics.per_agent_ttft(calls)["0"]
    assert a["timed"] == "paired" and a["ttft_ms_kvcomm"] == 50.0 and a["ttft_ms_prefix"] == 300.0
    assert a["baseline"] == "prefix" and a["speedup"] == pytest.approx(6.0) and a["speedup_vs_dense"] == 8.0
    free = metrics.per_agent_ttft(calls[:2])["0"]
    assert free["timed"] == "free-running" and free["baseline"] == "dense" and free["speedup"] == 40.0


def test_method_variants_replay_identical_calls_and_build_the_pareto_table(tiny, tmp_path):
    """The baselines as paired variants of one dense run: CacheBlend (moved bases, no
    anchors, a probe), EPIC, a hybrid and the fitted estimator; the run's own replay times
    the prefix-caching baseline. Their fidelity entries share the dense run's digest, and
    the Pareto table joins them; a run with other dense calls is refused."""
    import kvcomm
    from kvcomm.engine import KVCommEngine
    from kvcomm_app.analysis import pareto
    from kvcomm_app.cli_checks import parse_variant
    from kvcomm_app.runtime.fidelity_report import fidelity_entry
    from kvcomm_app.runtime.session import ExperimentConfig, run_experiment

    model, tok = tiny("llama")

    def factory(cfg):
        spec = kvcomm.hf.inspect_model(model)
        pool = kvcomm.PoolConfig(layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim, gamma=2.0)
        return KVCommEngine(model, tok, pool_config=pool), "tiny", "cpu", 0.0

    specs = ("method=cacheblend:0.2", "method=epic:2", "method=hybrid-deviation:0.1", "estimator=fit")
    variants = [(s, parse_variant(s)) for s in specs]
    assert variants[0][1] == {"estimator": "base", "recompute": "deviation,budget=0.2", "method": "cacheblend:0.2"}
    cfg = ExperimentConfig(task="gsm8k", n_agents=2, questions=2, warmup=2, max_new_tokens=6, gate=False,
                           paired=True, paired_positions=4, progress=False, free=False, variants=variants)
    res = run_experiment(cfg, engine_factory=factory, log=lambda *_: None)
    own = [c for q in res.records if q.mode == "paired" for c in q.calls]
    assert own and all(c.prefix_ttft_ms is not None and c.prefix_ttft_ms > 0 for c in own)
    blend = res.variants[0]
    calls = [c for q in blend.records if q.mode == "paired" for c in q.calls]
    # no anchors, so no warm-up replay, no partial calls; the probe ran on every estimated call
    assert calls and all(c.phase == "measure" for c in calls)
    assert all(c.path == "reuse" and c.probed_tokens == c.prompt_tokens - c.s0_tokens for c in calls)
    assert [q for q in blend.records if q.mode == "paired"][-1].pool_size == 0
    f = blend.summary["fidelity"]
    assert f["compute"]["probe"] > 0 and f["token_reuse"]["rate"] < f["token_reuse_excluding_encodings"]["rate"] + 1e-9
    epic = [c for q in res.variants[1].records if q.mode == "paired" for c in q.calls]
    assert all(set(c.recomputed) <= {"tail", "first", "segfirst"} for c in epic)
    entries = [fidelity_entry(r, command="test", commit=None) for r in [res] + res.variants]
    assert len({e["dense_digest"] for e in entries}) == 1
    assert [e["method"] for e in entries] == [None, "cacheblend:0.2", "epic:2", "hybrid-deviation:0.1", None]
    doc = pareto.build(entries)
    (c,) = doc["configs"]
    assert [p["method"] for p in c["points"]][:2] == ["kvcomm", "hybrid-deviation:0.1"]
    assert {p["family"] for p in c["points"]} == {"kvcomm", "hybrid-deviation", "fit/none", "cacheblend", "epic"}
    assert c["ttft_baselines_ms_median"]["prefix"] and "| gsm8k | 2 | cacheblend:0.2 |" in pareto.table(doc)
    pareto.plot(doc, str(tmp_path / "p.png"))
    other = dict(entries[1], dense_digest="different")
    with pytest.raises(ValueError, match="different dense calls"):
        pareto.build([entries[0], other])


def test_pareto_head_to_head_compares_at_equal_computed_share():
    """Each anchor-based point against CacheBlend interpolated at the same computed share;
    a point outside CacheBlend's measured range is left out; lower first-token KL wins."""
    from kvcomm_app.analysis import pareto

    def pt(method, kl, agree, share):
        fam, budget = pareto.family_budget(method)
        return {"method": method, "family": fam, "budget": budget, "first_token_kl": kl, "tf32_kl": kl / 2,
                "first_token_agreement": {"rate": agree}, "compute_share": share}

    points = [pt("kvcomm", 0.04, 0.90, 0.30), pt("hybrid-deviation:0.1", 0.005, 0.99, 0.45),
              pt("anchors-or-base-deviation:0.1", 0.02, 0.93, 0.10),
              pt("cacheblend:0.05", 0.05, 0.88, 0.20), pt("cacheblend:0.25", 0.01, 0.98, 0.40),
              pt("epic:4", 0.09, 0.80, 0.22)]
    rows = pareto.head_to_head(points)
    assert [r["method"] for r in rows] == ["kvcomm"]   # the others lie outside CacheBlend's 20-40%
    (r,) = rows
    assert r["theirs_first_token_kl"] == pytest.approx(0.03)     # halfway between 0.05 and 0.01
    assert r["theirs_first_token_agreement"] == pytest.approx(0.93)
    assert r["winner"] == "cacheblend" and r["first_token_kl_ratio"] == pytest.approx(0.04 / 0.03)
    assert r["first_token_agreement_diff"] == pytest.approx(-0.03)
    points[0]["first_token_kl"] = 0.02
    assert pareto.head_to_head(points)[0]["winner"] == "kvcomm"


def test_fidelity_entries_that_differ_in_planner_settings_are_kept_apart(tmp_path):
    # variants of one run differ only in such settings: each keeps its own entry
    from kvcomm_app.runtime.fidelity_report import update_fidelity_file
    base = {"task": "gsm8k", "agents": 3, "topology": "fully_connected", "questions": 4, "offset": 0,
            "recompute": "none", "partial": True, "pool": {"min_anchors": 4}, "max_new_tokens": 8,
            "estimator": "anchors", "head_share": None, "estimate_anchors": None}
    path = str(tmp_path / "f.json")
    for extra in ({}, {"estimate_anchors": 0}, {"head_share": 0.0}, {"estimate_anchors": 0}):
        update_fidelity_file(path, dict(base, **extra))
    runs = json.load(open(path))["runs"]
    assert [(r["head_share"], r["estimate_anchors"]) for r in runs] == [(None, None), (0.0, None), (None, 0)]
