"""What keeps the C++/CUDA build fast (CI rebuilds it four times on 2 cores: in place,
under the sanitizers, as a wheel and against the CUDA torch): every source includes the
ATen headers it uses, not the umbrella ones, and the build keeps its objects in one
directory so the wheel build reuses the editable install's objects."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("cpp", "cuda", "tests/cpp") for p in (ROOT / d).rglob("*")
                 if p.suffix in {".h", ".cpp", ".cu", ".cuh"})

# Each of these pulls in every ATen operator (or the whole libtorch C++ API):
# about 10-20 s of compile time per file on the CI machine.
UMBRELLA = {"ATen/ATen.h", "torch/torch.h", "torch/extension.h", "torch/all.h", "torch/python.h"}
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def test_sources_were_found():
    assert len(SOURCES) >= 20, SOURCES


def test_no_source_includes_an_umbrella_header():
    offenders = [f"{p.relative_to(ROOT)}: {h}" for p in SOURCES
                 for h in INCLUDE.findall(p.read_text()) if h in UMBRELLA]
    assert not offenders, "include the ATen/ops/<op>.h headers you use instead:\n" + "\n".join(offenders)


def test_free_aten_functions_have_their_operator_header():
    """at::empty(...) needs <ATen/ops/empty.h> somewhere in the file's own includes or
    in a project header it includes (the umbrella header used to hide this)."""
    by_name = {p.name: p for p in SOURCES}

    def includes(path: Path, seen: set[Path]) -> set[str]:
        if path in seen:
            return set()
        seen.add(path)
        found = set(INCLUDE.findall(path.read_text()))
        for h in list(found):
            local = by_name.get(Path(h).name)
            if local is not None:
                found |= includes(local, seen)
        return found

    missing = []
    for p in SOURCES:
        used = set(re.findall(r"\bat::([a-z_][a-z0-9_]*)\s*\(", p.read_text()))
        have = includes(p, set())
        for fn in sorted(used):
            if fn in {"parallel_for", "manual_seed", "has_internal_overlap", "get_cpu_capability"}:
                # not operators: ATen/Parallel.h, ATen/Context.h, ATen/MemoryOverlap.h,
                # ATen/Version.h
                continue
            if f"ATen/ops/{fn}.h" not in have:
                missing.append(f"{p.relative_to(ROOT)}: at::{fn} without <ATen/ops/{fn}.h>")
    assert not missing, "\n".join(missing)


def test_setup_keeps_objects_in_one_directory_unless_told_otherwise(tmp_path):
    """The editable install points build_ext at a throw-away directory; ours replaces it
    with build/ext-objects, but an explicit --build-temp (the CUDA compile check) wins."""
    probe = f"""
import sys, setuptools
sys.argv = ["setup.py"]
captured = {{}}
setuptools.setup = lambda **kw: captured.update(kw)
exec(open("setup.py").read(), {{"__file__": "setup.py", "__name__": "setup"}})
from setuptools import Distribution
cls = captured["cmdclass"]["build_ext"]
for explicit in (None, {str(tmp_path)!r}):
    cmd = cls(Distribution({{"ext_modules": captured["ext_modules"]}}))
    cmd.initialize_options()
    cmd.build_temp = explicit
    cmd.finalize_options()
    print(cmd.build_temp)
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    default, explicit = out.stdout.split()
    assert Path(default) == ROOT / "build" / "ext-objects"
    assert Path(explicit) == tmp_path
