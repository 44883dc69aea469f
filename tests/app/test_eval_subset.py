"""benchmarks/eval_subset.py: the first N measured questions of an eval's records; over
all of them it must give back the summary the eval itself wrote. Pooling runs over
disjoint questions must count every question once."""
from __future__ import annotations

import json
import os

import pytest

from kvcomm_app.analysis import eval_subset as subset
from kvcomm_app.runtime.records import read_records, record_to_dict, write_records

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
RUN = os.path.join(ROOT, "results", "quality", "eval-humaneval-smollm2-135m")


def _records():
    return read_records(RUN + ".jsonl.gz")


def test_records_read_the_same_compressed_or_plain(tmp_path):
    """results/ keeps raw records as .jsonl.gz; every reader takes either form."""
    records = _records()[:6]
    for name in ("r.jsonl", "r.jsonl.gz"):
        write_records(records, str(tmp_path / name))
    assert (tmp_path / "r.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"   # gzip's magic number
    plain, packed = (read_records(str(tmp_path / n)) for n in ("r.jsonl", "r.jsonl.gz"))
    assert [record_to_dict(r) for r in plain] == [record_to_dict(r) for r in packed] == \
        [record_to_dict(r) for r in records]


def test_all_questions_give_the_evals_own_summary():
    with open(RUN + ".json") as f:
        written = json.load(f)
    records = _records()
    n = written["questions"]
    got = subset.metrics.summarize(subset.first_questions(records, n))
    for key in ("questions", "reuse_rate", "accuracy", "answer_agreement", "judge_consistency",
                "first_token_agreement", "first_token_pairs", "first_token_agreement_reuse"):
        assert got[key] == pytest.approx(written[key]), key


def test_a_prefix_keeps_both_modes_of_the_first_questions_and_the_warm_up():
    records = _records()
    sub = subset.first_questions(records, 10)
    measured = [r for r in sub if r.phase == "measure"]
    ids = {r.question_id for r in measured}
    assert len(ids) == 10 and len(measured) == 20
    assert sorted(r.mode for r in measured) == ["dense"] * 10 + ["kvcomm"] * 10
    assert [r for r in records if r.phase != "measure"] == [r for r in sub if r.phase != "measure"]
    with pytest.raises(SystemExit, match="fewer than"):
        subset.first_questions(records, 1000)


def _split(records, n):
    """The records as two runs: the first n measured questions and the rest, each with
    the warm-up (as two `kvcomm eval --offset` runs would have)."""
    first = subset.first_questions(records, n)
    head_ids = subset.measured_ids(first)
    rest = [r for r in records if r.phase != "measure" or r.question_id not in head_ids]
    return first, rest


def test_pooling_two_disjoint_runs_gives_the_whole_runs_summary():
    records = _records()
    first, rest = _split(records, 15)
    whole = subset.metrics.summarize(records)
    pooled = subset.metrics.summarize(subset.pooled({"a": first, "b": rest}))
    assert pooled["questions"] == whole["questions"] == 40
    for key in ("reuse_rate", "accuracy", "answer_agreement", "judge_consistency",
                "first_token_agreement", "first_token_agreement_reuse"):
        assert pooled[key] == pytest.approx(whole[key]), key


def test_pooling_refuses_runs_that_share_a_question():
    records = _records()
    first, _ = _split(records, 5)
    with pytest.raises(SystemExit, match="measured in both a and b"):
        subset.pooled({"a": records, "b": first})


def _two_run_files(tmp_path, n):
    """The recorded run split after n measured questions, written as two records files,
    one plain and one compressed (the command line reads both)."""
    paths = []
    for name, part in zip(("a.jsonl", "b.jsonl.gz"), _split(_records(), n)):
        path = str(tmp_path / name)
        write_records(part, path)
        paths.append(path)
    return paths


def test_the_command_line_pools_files_and_takes_first(tmp_path, capsys):
    paths = _two_run_files(tmp_path, 15)
    assert subset.main(paths + ["--first", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["questions"] == 20 and "decision" in out["agents"]
    with pytest.raises(SystemExit):
        subset.main(paths + ["--first", "0"])


def test_the_json_file_holds_the_summary_and_where_it_came_from(tmp_path, capsys):
    paths = _two_run_files(tmp_path, 15)
    out_path = tmp_path / "pooled.json"
    assert subset.main(paths + ["--first", "20", "--json", str(out_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out_path.read_text())
    assert {k: written[k] for k in printed} == printed
    # --first 20 keeps all 15 questions of the first run and 5 of the second
    assert written["sources"] == [dict(records=paths[0], questions=15), dict(records=paths[1], questions=5)]
    assert written["command"].startswith("python benchmarks/eval_subset.py ")
    assert written["command"].endswith(f"--json {out_path}")
