"""CI-sized soak: the demo graph (4 agents + decision, runtime GraphRunner)
over many requests on a tiny random Llama with a pool byte budget that forces eviction.

Asserts: no exception; pool bytes never over the budget (and the budget really binds:
evictions happen); RSS and the count of gc-tracked Python objects after warm-up stay
within bounds that a realistic leak breaks
(test_the_rss_bound_catches_a_leak keeps every call's KV cache alive, as a bug that holds
on to caches would, and must exceed it); the reuse rate is non-zero in every window after
the cold start. The full-size soak on SmolLM2 is benchmarks/soak.py --full
(results/soak/soak-cpu.json, docs/soak-rss.png).

Each soak runs in a fresh Python process (this file run as a script): inside the long
pytest process, memory freed by earlier tests sits in malloc's heap and silently absorbs a
leak, so RSS growth there says nothing (CI saw 1.6 MiB growth with the leak injected).
The child also fixes glibc's mmap threshold, which otherwise moves with the sizes freed and
decides whether a freed tensor returns to the OS or stays resident.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvcomm_app.bench import soak

BUDGET = 2 ** 21             # below the 2.4 MiB the unbounded pool reaches in this run: it evicts (14 times)
RSS_GROWTH_MIB = 10.0       # fresh process: 1.0-1.9 MiB measured without a leak, 21.6-23.5 MiB with it
OBJECT_GROWTH = 50          # gc-tracked objects after warm-up: measured 0 without a leak, +1000 with it
REQUESTS, WINDOW, WARM = 30, 10, 10
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}


def _soak_in_child(scenario: str) -> dict:
    """Runs `scenario` ("plain" or "leak") in a fresh interpreter; returns its report."""
    env = dict(os.environ, **CHILD_ENV)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), scenario], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"soak child ({scenario}) failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_main(scenario: str) -> None:
    import torch

    import kvcomm
    from kvcomm.engine import KVCommEngine, gate
    from kvcomm.models import random_model
    from kvcomm_app.runtime.datasets import Problem

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tok = random_model("llama")
    eng = KVCommEngine(model, tok, kvcomm.PoolConfig(gamma=1.0, byte_budget=BUDGET))
    questions = gate.probe_questions(REQUESTS, seed=11, long=True)
    problems = [Problem("gsm8k", f"soak/{i}", q, "0") for i, q in enumerate(questions)]
    runner = soak.demo_runner(eng, max_new_tokens=8)
    leaked = []
    if scenario == "leak":
        # Keeps every call's KV cache alive, as a bug that holds on to caches would.
        real_call = eng.call

        def leaky_call(*a, **k):
            out = real_call(*a, **k, keep_cache=True)
            leaked.append(out.cache)
            return out

        eng.call = leaky_call
    rep = soak.run_soak(runner, problems, REQUESTS, window=WINDOW, warm=WARM, log=None)
    rep["leaked_caches"] = len(leaked)
    rep["pool_bytes_now"] = int(eng.pool.memory_bytes())
    print(json.dumps(rep))


def test_soak_memory_bounded_reuse_steady():
    rep = _soak_in_child("plain")
    assert rep["exceptions"] == 0, rep["errors"]
    assert rep["requests"] == REQUESTS and rep["calls"] == 5 * REQUESTS
    pool = rep["pool"]
    assert pool["over_budget_samples"] == 0 and 0 < pool["max_bytes"] <= BUDGET
    assert all(s["pool_bytes"] <= BUDGET for s in rep["samples"])
    assert pool["evictions"] > 0, "the budget never bound: the soak did not test it"
    growth = rep["rss_mib"]["growth_after_warmup"]
    assert growth is not None and growth < RSS_GROWTH_MIB, rep["rss_mib"]
    assert abs(rep["py_objects"]["growth_after_warmup"]) <= OBJECT_GROWTH, rep["py_objects"]
    rates = [w["reuse_or_partial_rate"] for w in rep["reuse_rate_windows"]]
    assert len(rates) == REQUESTS // WINDOW
    # calls that reuse (every slot estimated, or some: a partial call) after the cold start
    assert all(r is not None and r >= 0.2 for r in rates[1:]), rates
    assert all(w["reuse_calls"] > 0 for w in rep["reuse_rate_windows"][1:]), rep["reuse_rate_windows"]
    assert rep["reuse_rate"] > 0
    # The pool object the engine reports is the one that was sampled.
    assert rep["pool_bytes_now"] == rep["samples"][-1]["pool_bytes"]


def test_the_rss_bound_catches_a_leak():
    """The same soak with every call's KV cache kept alive must break the RSS bound:
    the bound above is tight enough to see a real leak."""
    rep = _soak_in_child("leak")
    assert rep["exceptions"] == 0
    assert rep["leaked_caches"] == 5 * REQUESTS
    assert rep["rss_mib"]["growth_after_warmup"] > RSS_GROWTH_MIB, rep["rss_mib"]
    assert rep["py_objects"]["growth_after_warmup"] > OBJECT_GROWTH, rep["py_objects"]


def test_summary_of_samples():
    samples = [{"request": i + 1, "elapsed_s": float(i), "wall_s": 1.0, "rss_mib": 100.0 + i,
                "pool_bytes": 10 * i, "anchors": i, "evictions": 0, "calls": 5, "reuse_calls": i % 5,
                "py_objects": 1000 + 3 * i}
               for i in range(8)]
    rep = soak.summarize(samples, [], budget=50, window=4, warm=2, rss_start_mib=90.0)
    assert [w["reuse_calls"] for w in rep["reuse_rate_windows"]] == [0 + 1 + 2 + 3, 4 + 0 + 1 + 2]
    assert rep["reuse_rate_windows"][1]["reuse_rate"] == pytest.approx(7 / 20)
    assert rep["pool"]["over_budget_samples"] == 2          # 60 and 70 bytes > 50
    assert rep["rss_mib"]["after_warmup"] == 101.0 and rep["rss_mib"]["growth_after_warmup"] == 6.0
    assert rep["rss_mib"]["slope_mib_per_100_requests_second_half"] == pytest.approx(100.0)
    assert rep["py_objects"] == {"after_warmup": 1003, "final": 1021, "max": 1021, "growth_after_warmup": 18}
    assert soak.summarize([{**x, "py_objects": None} for x in samples], [], budget=50, window=4, warm=2,
                          rss_start_mib=90.0)["py_objects"] is None
    assert soak.rss_bytes() > 0


if __name__ == "__main__":
    _child_main(sys.argv[1])
