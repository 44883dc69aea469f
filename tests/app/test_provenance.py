"""kvcomm_app.provenance: the commit, the dirty flag and the command every results file
records, read from a real git checkout; and no results writer reads them another way."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from kvcomm_app import provenance

ROOT = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A one-commit repository that provenance reads as its own checkout."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    monkeypatch.setattr(provenance, "_HERE", str(repo))
    return repo


def test_sha_and_dirty_flag_follow_the_checkout(checkout):
    clean = provenance.capture("kvcomm", argv=["eval"])
    assert clean.git_sha == _git(checkout, "rev-parse", "HEAD") and len(clean.git_sha) == 40
    assert clean.git_dirty is False and clean.marked_sha == clean.git_sha
    (checkout / "notes.txt").write_text("untracked files do not run\n")
    assert provenance.git_dirty() is False
    (checkout / "code.py").write_text("x = 2\n")
    dirty = provenance.capture("kvcomm", argv=["eval"])
    assert dirty.git_dirty is True and dirty.marked_sha == clean.git_sha + "-dirty"
    assert dirty.fields() == {"git_sha": clean.git_sha, "git_dirty": True, "command": "kvcomm eval"}


def test_outside_a_checkout_nothing_is_made_up(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_HERE", str(tmp_path))
    made = provenance.capture("python", "benchmarks/soak.py", argv=[])
    assert (made.git_sha, made.git_dirty, made.marked_sha) == (None, None, "unknown")
    assert made.command == "python benchmarks/soak.py"


def test_commands_are_quoted_to_run_when_pasted(monkeypatch):
    argv = ["--paired-variant", "min_anchors=2 storage=int8", "--json", "out dir/x.json"]
    line = provenance.command("python", "benchmarks/x.py", argv=argv)
    assert shlex.split(line) == ["python", "benchmarks/x.py", *argv]
    monkeypatch.setattr("sys.argv", ["/usr/bin/kvcomm", "demo", "--threads", "1"])
    assert provenance.command("kvcomm") == "kvcomm demo --threads 1"   # argv None: the process's own


def test_device_and_machine_fields():
    detail = provenance.device_detail("cpu", torch.float32)
    assert detail == provenance.device_detail("cpu", "float32")
    assert re.fullmatch(rf"cpu, float32, torch {re.escape(torch.__version__)}, \d+ threads, \d+ cores, \S+", detail)
    load = provenance.load_average()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load) and provenance.load_1m() == load[0])
    assert provenance.package_version("torch") and provenance.package_version("no-such-package-kvcomm") is None


def test_no_results_writer_reads_git_or_the_load_itself():
    """One helper for every writer: a second way of reading the commit, the load or the
    command would drift from it (different field meanings, unquoted commands)."""
    sources = [p for p in (ROOT / "python" / "kvcomm_app").rglob("*.py") if p.name != "provenance.py"]
    sources += sorted((ROOT / "benchmarks").glob("*.py"))
    pattern = re.compile(r"rev-parse|getloadavg|shlex\.join\(\s*\[\s*\"(?:python|kvcomm)\"")
    offenders = [str(p.relative_to(ROOT)) for p in sources if pattern.search(p.read_text())]
    assert len(sources) > 30 and offenders == []
