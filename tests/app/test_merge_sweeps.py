"""benchmarks/merge_sweeps.py: sweeps over disjoint parts of one grid (each with its own,
identical dense pass) become one table; different settings, a different dense run or a
grid point present twice are refused."""
from __future__ import annotations

import json

from sweep_args import sweep_args

from kvcomm_app import cli
from kvcomm_app.analysis import merge_sweeps
from kvcomm_app.runtime.testing import ScriptedEngine


def _sweep(tmp_path, name: str, gammas: str, capacities: str, questions: int = 2) -> str:
    out = tmp_path / f"{name}.json"
    args = sweep_args(out, gammas, capacities, questions=questions, name=name)
    assert cli.cmd_eval(args, sweep_factory=lambda pool: ScriptedEngine(warm_after=1)) == 0
    return str(out)


def test_disjoint_sweeps_merge_into_one_sorted_grid(tmp_path, capsys):
    a = _sweep(tmp_path, "a", "0.9,0.3", "20")
    b = _sweep(tmp_path, "b", "0.3", "5")
    out = tmp_path / "merged.json"
    assert merge_sweeps.main([a, b, "--json", str(out)]) == 0
    assert "| gamma | capacity |" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert [(r["gamma"], r["capacity"]) for r in doc["grid"]] == [(0.3, 5), (0.3, 20), (0.9, 20)]
    assert doc["sweep"]["points"] == 3 and doc["sweep"]["complete"] is True
    assert doc["sweep"]["dense_runs"] == 2 and doc["sweep"]["capacities"] == [5, 20]
    assert (doc["default_point"]["gamma"], doc["default_point"]["capacity"]) == (0.3, 20)
    assert [s["path"] for s in doc["sources"]] == [a, b]
    assert [s["command"] for s in doc["sources"]] == ["kvcomm eval --sweep a", "kvcomm eval --sweep b"]
    assert doc["questions"] == 2 and doc["command"].startswith("python benchmarks/merge_sweeps.py")


def test_a_point_in_two_sweeps_is_refused(tmp_path, capsys):
    a = _sweep(tmp_path, "a", "0.3", "5,20")
    b = _sweep(tmp_path, "b", "0.3", "20")
    assert merge_sweeps.main([a, b]) == 2
    assert "capacity=20" in capsys.readouterr().err


def test_different_settings_or_dense_runs_are_refused(tmp_path, capsys):
    a = _sweep(tmp_path, "a", "0.3", "5")
    b = _sweep(tmp_path, "b", "0.3", "20", questions=3)
    assert merge_sweeps.main([a, b]) == 2
    assert "questions=3" in capsys.readouterr().err
    c = _sweep(tmp_path, "c", "0.9", "5")
    doc = json.loads(open(c).read())
    doc["dense"]["accuracy"] = 0.5 if doc["dense"]["accuracy"] != 0.5 else 0.25
    open(c, "w").write(json.dumps(doc))
    assert merge_sweeps.main([a, c]) == 2
    assert "not the same dense run" in capsys.readouterr().err
