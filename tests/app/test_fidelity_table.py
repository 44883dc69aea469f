"""kvcomm_app.analysis.fidelity_table: one markdown row per run of results/quality/fidelity.json."""
from __future__ import annotations

import json

from kvcomm_app.analysis import fidelity_table


def _run(**kw):
    run = {"task": "gsm8k", "agents": 3, "questions": 12, "pool": {"min_anchors": 4}, "recompute": "segments",
           "partial": True, "paired_calls": 40,
           "first_token_agreement": {"rate": 0.975, "n": 40, "k": 39, "ci95": [0.871, 0.996]},
           "first_token_kl": 0.01234, "tf32_agreement": {"rate": 0.96, "n": 1000, "k": 960, "ci95": [0.946, 0.97]},
           "tf32_kl": 0.02, "token_reuse": {"rate": 0.8, "n": 5000, "k": 4000, "ci95": [0.79, 0.81]},
           "token_reuse_with_encoding": {"rate": 0.7, "n": 5000, "k": 3500, "ci95": None},
           "call_reuse": {"rate": 0.5}, "call_reuse_or_partial": {"rate": 0.75},
           "accuracy": {"dense": {"rate": 0.25, "n": 12, "k": 3, "ci95": [0.09, 0.53]}, "kvcomm": None},
           "f1": {"dense": None, "kvcomm": None}}
    run.update(kw)
    return run


def test_rows_carry_rates_intervals_and_settings(tmp_path, capsys):
    path = tmp_path / "fidelity.json"
    path.write_text(json.dumps({"runs": [_run(), _run(task="squad", partial=False, pool={},
                                                      f1={"dense": {"mean": 0.41}, "kvcomm": {"mean": 0.4}})]}))
    assert fidelity_table.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| task |")
    assert "| gsm8k | 3 | 12 | m=4, segments | 40 | 97.5% [87.1, 99.6] | 0.0123 |" in lines[2]
    assert "| 50% / 25% |" in lines[2] and lines[2].endswith("| 25.0% / - |")
    # an entry from before the accounting change: its token_reuse left the encodings out
    assert "| 80.0% [79.0, 81.0] | 50% / 25% |" in lines[2] and "| 70.0% | 80.0% [79.0, 81.0] |" in lines[2]
    assert "m=2, segments, no partial" in lines[3] and lines[3].endswith("| F1 41.0 / 40.0 |")
    assert fidelity_table.main([str(path), "--task", "squad"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
