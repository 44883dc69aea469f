"""benchmarks/anchor_memory.py's parts on small layouts: byte counts by storage and agents,
the scale comparison, the estimate timing rows and the fidelity table it files."""
import json

import pytest
import torch

import kvcomm
from kvcomm_app.bench import anchor_memory as am

SMALL = dict(layers=2, heads=2, dim=16, dtype=torch.float32)


def test_bytes_grow_with_agents_and_shrink_with_storage():
    sizes = am.bytes_by_agents(SMALL, tokens=32, segment=8, agents=3)
    per_token = SMALL["layers"] * SMALL["heads"] * SMALL["dim"]
    base = 2 * 32 * per_token * 4
    agent = 2 * (32 + 8) * per_token * 4
    assert sizes["model"] == [base + agent, base + 2 * agent, base + 3 * agent]
    assert sizes["bf16"] == [b // 2 for b in sizes["model"]]
    scales = 6 * per_token * 4  # a float per (layer, head, channel) for each of the 6 tensors
    assert sizes["int8"][0] == (base + agent) // 4 + scales
    assert sizes["int8"] == sizes["fp8"]


def test_scale_choice_prefers_channel_scales_on_outlier_channels(tmp_path):
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 24, 16, generator=g)
    x[..., 5] *= 50  # one channel dominates, as keys' outlier channels do
    aid = pool.add_anchor("q", x, x)
    pool.record_deltas("q", aid, "a", 0.01 * x, 0.01 * x)
    path = str(tmp_path / "p.bin")
    pool.save(path)
    choice = am.scale_choice(path)
    assert set(choice) == {"base_k", "base_v", "placeholder_delta_k", "placeholder_delta_v"}
    base = choice["base_k"]
    assert base["tensors"] == 1
    assert base["int8/channel"] < base["int8/token"] < base["int8/layer_head"]


def test_estimate_rows_time_every_storage():
    row = am.estimate_times(SMALL, tokens=20, segment=4, anchors=3, rounds=2)
    for part in ("estimate", "decide"):
        assert set(row[part]["ms"]) == set(am.STORAGES)
        assert row[part]["bytes"]["int8"] < row[part]["bytes"]["bf16"] < row[part]["bytes"]["model"]
        assert row[part]["ratio_to_model"]["model"] == 1.0


def test_budget_fidelity_lists_every_setting(tmp_path):
    runs = [{"task": "gsm8k", "agents": 3, "pool": {"min_anchors": 2}, "first_token_agreement": {"rate": 0.9},
             "final_pool": {"anchors": 6, "bytes": 60}},
            {"task": "gsm8k", "agents": 3, "pool": {"min_anchors": 2, "storage": "int8", "byte_budget": 100},
             "first_token_agreement": {"rate": 0.95}}]
    fid = tmp_path / "f.json"
    fid.write_text(json.dumps({"runs": runs}))
    out = am.budget_fidelity(str(fid))
    assert [(r["storage"], r["byte_budget"], r.get("final_pool")) for r in out] == [
        ("model", 0, {"anchors": 6, "bytes": 60}), ("int8", 100, None)]
