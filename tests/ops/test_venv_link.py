""".ci/venv_link.py, which gives the CUDA wheel's install check a fresh venv with
torch: the distributions named and everything they require, hard-linked from
this environment with their .dist-info records (checked here with this
environment's torch, on a throwaway directory)."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os

from backends import ROOT

spec = importlib.util.spec_from_file_location("venv_link", ROOT / ".ci" / "venv_link.py")
venv_link = importlib.util.module_from_spec(spec)
spec.loader.exec_module(venv_link)


def test_the_closure_follows_requirements_and_theirs():
    names = {d.metadata["Name"].lower() for d in venv_link.closure(["torch"])}
    assert {"torch", "filelock", "sympy", "jinja2"} <= names
    assert {"markupsafe", "mpmath"} <= names, "requirements of requirements (jinja2's, sympy's)"
    assert "pip" not in names and "pytest" not in names


def test_files_are_linked_with_their_records(tmp_path):
    dest = tmp_path / "site-packages"
    assert venv_link.main([str(dest), "torch"]) == 0
    src = md.distribution("torch").locate_file("torch/__init__.py")
    linked = dest / "torch" / "__init__.py"
    assert linked.read_bytes() == open(src, "rb").read()
    if os.stat(src).st_dev == os.stat(dest).st_dev:  # a copy only across filesystems
        assert os.path.samefile(src, linked)
    assert len(list(dest.glob("torch-*.dist-info/RECORD"))) == 1
    # the linked tree is an installed torch to importlib.metadata (and so to pip)
    found = {d.metadata["Name"]: d.version for d in md.distributions(path=[str(dest)])}
    assert found["torch"] == md.version("torch") and "sympy" in found
    # console scripts (RECORD paths outside site-packages) are left out
    assert [p.name for p in tmp_path.iterdir()] == ["site-packages"]


def test_usage_without_names():
    assert venv_link.main([]) == 2
