"""benchmarks/share_decisions_random_texts.py: its decisions are the core ops' share-or-anchor
decisions, and the script runs end to end on a tiny version of the 8B-shaped random model."""
from __future__ import annotations

import json

import torch

from kvcomm_app.bench import share_decisions_random_texts as random_texts


def test_a_copy_of_an_anchor_shares_and_equidistant_anchors_do_not():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    near_a = a + 1e-3
    rows = random_texts.decisions([a, b, near_a], tau=1.0, gamma=0.3, top_p=0.9)
    assert len(rows) == 1 and rows[0]["share"] and rows[0]["gap"] > 1.0
    # two anchors at the same distance: entropy 1 bit > 0.3 -> new anchor
    c = torch.zeros(2, 2, 5, 8)
    rows = random_texts.decisions([c + 1, c - 1, c], tau=1.0, gamma=0.3, top_p=0.9)
    assert not rows[0]["share"] and abs(rows[0]["entropy_bits"] - 1.0) < 1e-5 and rows[0]["gap"] == 0.0


def test_script_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    import kvcomm_app.bench.models as bench_models

    real = bench_models.llama_8b_random

    def small(device, dtype, **kw):   # the same builder, narrow enough for a test
        return real(device, dtype, **dict(kw, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, vocab_size=512))

    monkeypatch.setattr(bench_models, "llama_8b_random", small)
    out = tmp_path / "decisions.json"
    assert random_texts.main(["--layers", "1", "--tokens", "12", "--texts", "4", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["decisions"]) == 2 and doc["shared"] == sum(r["share"] for r in doc["decisions"])
    assert all(r["nearest"] > 0 and r["threshold_bits"] > 0 for r in doc["decisions"])
    assert doc["command"].startswith("python benchmarks/share_decisions_random_texts.py --layers 1")
    assert random_texts.main(["--texts", "2"]) == 2
