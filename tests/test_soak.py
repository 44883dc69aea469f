"""CI-sized soak (issue 7.5): the demo graph (4 agents + decision, runtime GraphRunner)
over many requests on a tiny random Llama with a pool byte budget that forces eviction.

Asserts: no exception; pool bytes never over the budget (and the budget really binds:
evictions happen); RSS after warm-up stays within a bound that a realistic leak breaks
(test_the_rss_bound_catches_a_leak keeps every call's KV cache alive, as a bug that holds
on to caches would, and must exceed it); the reuse rate is non-zero in every window after
the cold start. The full-size soak on SmolLM2 is benchmarks/soak.py --full
(results/soak-cpu.json, docs/soak-rss.png).
"""
from __future__ import annotations

import importlib.util
import os

import pytest

import kvcomm
from kvcomm.engine import KVCommEngine, gate
from kvcomm.runtime.datasets import Problem

_spec = importlib.util.spec_from_file_location(
    "kvcomm_soak", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "soak.py"))
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

BUDGET = 3 * 2 ** 20        # about half of what the unbounded pool reaches in this run
RSS_GROWTH_MIB = 10.0       # measured 2-3 MiB; the injected leak below adds ~20 MiB
REQUESTS, WINDOW, WARM = 30, 10, 10


def _setup(tiny):
    model, tok = tiny("llama")
    eng = KVCommEngine(model, tok, kvcomm.PoolConfig(gamma=1.0, byte_budget=BUDGET))
    questions = gate.probe_questions(REQUESTS, seed=11, long=True)
    problems = [Problem("gsm8k", f"soak/{i}", q, "0") for i, q in enumerate(questions)]
    return eng, soak.demo_runner(eng, max_new_tokens=8), problems


def test_soak_memory_bounded_reuse_steady(tiny):
    eng, runner, problems = _setup(tiny)
    rep = soak.run_soak(runner, problems, REQUESTS, window=WINDOW, warm=WARM, log=None)
    assert rep["exceptions"] == 0, rep["errors"]
    assert rep["requests"] == REQUESTS and rep["calls"] == 5 * REQUESTS
    pool = rep["pool"]
    assert pool["over_budget_samples"] == 0 and 0 < pool["max_bytes"] <= BUDGET
    assert all(s["pool_bytes"] <= BUDGET for s in rep["samples"])
    assert pool["evictions"] > 0, "the budget never bound: the soak did not test it"
    growth = rep["rss_mib"]["growth_after_warmup"]
    assert growth is not None and growth < RSS_GROWTH_MIB, rep["rss_mib"]
    rates = [w["reuse_rate"] for w in rep["reuse_rate_windows"]]
    assert len(rates) == REQUESTS // WINDOW
    assert all(r is not None and r >= 0.2 for r in rates[1:]), rates
    assert rep["reuse_rate"] > 0
    # The pool object the engine reports is the one that was sampled.
    assert eng.pool.memory_bytes() == rep["samples"][-1]["pool_bytes"]


def test_the_rss_bound_catches_a_leak(tiny, monkeypatch):
    """The same soak with every call's KV cache kept alive must break the RSS bound:
    the bound above is tight enough to see a real leak."""
    eng, runner, problems = _setup(tiny)
    leaked = []
    real_call = eng.call

    def leaky_call(*a, **k):
        eng.keep_last_cache = True
        out = real_call(*a, **k)
        leaked.append(eng.last_cache)
        return out

    monkeypatch.setattr(eng, "call", leaky_call)
    rep = soak.run_soak(runner, problems, REQUESTS, window=WINDOW, warm=WARM, log=None)
    assert rep["exceptions"] == 0
    assert len(leaked) == 5 * REQUESTS
    assert rep["rss_mib"]["growth_after_warmup"] > RSS_GROWTH_MIB, rep["rss_mib"]


def test_summary_of_samples():
    samples = [{"request": i + 1, "elapsed_s": float(i), "wall_s": 1.0, "rss_mib": 100.0 + i,
                "pool_bytes": 10 * i, "anchors": i, "evictions": 0, "calls": 5, "reuse_calls": i % 5}
               for i in range(8)]
    rep = soak.summarize(samples, [], budget=50, window=4, warm=2, rss_start_mib=90.0)
    assert [w["reuse_calls"] for w in rep["reuse_rate_windows"]] == [0 + 1 + 2 + 3, 4 + 0 + 1 + 2]
    assert rep["reuse_rate_windows"][1]["reuse_rate"] == pytest.approx(7 / 20)
    assert rep["pool"]["over_budget_samples"] == 2          # 60 and 70 bytes > 50
    assert rep["rss_mib"]["after_warmup"] == 101.0 and rep["rss_mib"]["growth_after_warmup"] == 6.0
    assert rep["rss_mib"]["slope_mib_per_100_requests_second_half"] == pytest.approx(100.0)
    assert soak.rss_bytes() > 0
