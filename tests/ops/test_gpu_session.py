"""benchmarks/gpu_session.sh, the one-call plan for a session with a lent GPU: its
control flow, checked with a stand-in Python that records what it is asked to run
(and with which PYTHONPATH); the real stages need a GPU. The script's dry run
(KVCOMM_GPU_DRY_RUN=1) runs the real CPU equivalents; it is timed by hand, not
here (minutes)."""
from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
DOC = ROOT / "docs" / "cuda-wheel.md"

FAKE_PY = """#!/usr/bin/env bash
echo "$*|${PYTHONPATH:-}" >> "$CALLS"
case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && exit 3 ;; esac
case "$*" in *"$SLOW_ON"*) [ -n "$SLOW_ON" ] && sleep 30 ;; esac
case "$*" in *pytest*) echo "7 passed, 2 skipped in 1.23s" ;; esac
exit 0
"""


def _run(tmp_path, *stages, fail_on="", slow_on="", deadline=None, min_stage=None):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    (tmp_path / "out").mkdir(exist_ok=True)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), KVCOMM_GPU_WORK=str(tmp_path / "work"),
               CALLS=str(calls), FAIL_ON=fail_on, SLOW_ON=slow_on, PYTHONPATH="")
    env.pop("KVCOMM_GPU_DRY_RUN", None)
    if deadline is not None:
        env["KVCOMM_GPU_DEADLINE_S"] = str(deadline)
    if min_stage is not None:
        env["KVCOMM_GPU_MIN_STAGE_S"] = str(min_stage)
    p = subprocess.run(["bash", str(SCRIPT), *stages], env=env, capture_output=True, text=True, timeout=120)
    # "-c ..." and "-" (a script on stdin) are the plan's own checks, not stages
    lines = []
    for c in calls.read_text().splitlines():
        args, pythonpath = c.rsplit("|", 1)
        if not args.startswith("-c ") and args != "-":
            lines.append((args, pythonpath))
    return p, lines


def _kind(args: str) -> str:
    for needle, kind in [("pip install", "build"), ("build_ext --inplace", "build-inplace"), ("pytest", "test"),
                         ("benchmarks/ops.py", "ops"), ("--scaling agents", "scaling-agents"),
                         ("--scaling prefix", "scaling-prefix"), ("--share always", "ttft-share"),
                         ("bench ttft", "ttft-gate")]:
        if needle in args:
            return kind
    return args


def test_all_runs_the_tests_right_after_the_build(tmp_path):
    p, calls = _run(tmp_path, "all")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [_kind(a) for a, _ in calls] == ["build", "test", "ops", "ttft-share", "ttft-gate", "scaling-agents",
                                            "scaling-prefix"]
    test = next(a for a, _ in calls if "pytest" in a)
    assert "tests/ops" in test
    # $OUT holds one archive (the device tool brings back few files) with every log
    with tarfile.open(tmp_path / "out" / "gpu-session.tgz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "gpu-session.tgz"]
    assert {"gpu.txt", "build.log", "test.log", "ops.log", "ttft-share.log", "ttft-gate.log",
            "scaling-agents.log", "scaling-prefix.log"} <= names
    # The summary: every stage with its status, the test counts
    summary = p.stdout[p.stdout.index("== summary"):]
    for stage in ["build", "test", "ops", "ttft-share", "ttft-gate", "scaling-agents", "scaling-prefix"]:
        assert any(line.split()[:2] == [stage, "ok"] for line in summary.splitlines()), (stage, summary)
    assert "7 passed, 2 skipped" in summary and "== done" in p.stdout


def test_the_caps_leave_the_tests_their_time(tmp_path):
    text = SCRIPT.read_text()
    build_cap = int(text.split("run_stage build ")[1].split()[0])
    test_cap = int(text.split("run_stage test ")[1].split()[0])
    deadline = int(text.split("KVCOMM_GPU_DEADLINE_S:-")[1].split("}")[0])
    assert build_cap + test_cap <= deadline - 120, "build + test caps must leave the benchmarks a share"


def test_the_build_cap_fits_the_measured_compile_times():
    # docs/cuda-wheel.md lists each object's compile time (arch 9.0a, one job, the CI
    # machine). With the device's 16 cores the build takes about its longest object, or
    # the total over 16 if that is more; the cap keeps 3x that for what is not measured
    # here (the device's cores and disk, pip's own time). Every cuda/*.cu must be listed,
    # so a new translation unit brings new measurements.
    text = SCRIPT.read_text()
    build_cap = int(text.split("run_stage build ")[1].split()[0])
    rows = re.findall(r"^\| `((?:cpp|cuda)/\w+)\.o` \| ([\d.]+) \|", DOC.read_text(), re.M)
    assert {Path(o).name for o, _ in rows if o.startswith("cuda/")} == {p.stem for p in (ROOT / "cuda").glob("*.cu")}
    assert {Path(o).name for o, _ in rows if o.startswith("cpp/")} == {p.stem for p in (ROOT / "cpp").glob("*.cpp")}
    times = [float(t) for _, t in rows]
    estimate = max(max(times), sum(times) / 16)
    assert build_cap >= 3 * estimate, (build_cap, estimate)


def test_a_failing_pip_install_falls_back_to_an_in_place_build(tmp_path):
    p, calls = _run(tmp_path, "build", "test", "ops", fail_on="pip install")
    assert p.returncode == 0, p.stdout + p.stderr
    kinds = [_kind(a) for a, _ in calls]
    assert kinds == ["build", "build-inplace", "test", "ops"]
    # the stages after the build import the in-place library
    for args, pythonpath in calls[2:]:
        assert pythonpath.split(":")[0] == str(ROOT / "python"), (args, pythonpath)
    assert "build_ext --inplace" in (tmp_path / "work" / "build.log").read_text()


def test_a_failing_stage_is_reported_and_the_rest_still_run(tmp_path):
    p, calls = _run(tmp_path, "build", "ops", "ttft", fail_on="benchmarks/ops.py")
    assert p.returncode == 3
    assert "== ops: FAILED (exit 3)" in p.stdout and "== ttft-share: ok" in p.stdout
    assert any("bench ttft" in a for a, _ in calls)
    summary = p.stdout[p.stdout.index("== summary"):]
    assert any(line.split()[:3] == ["ops", "FAILED", "3"] for line in summary.splitlines()), summary


def test_stages_stop_at_the_deadline(tmp_path):
    # the build is cut off by the deadline (30 s sleep, 4 s deadline); nothing after it
    # has the 2 s a stage needs here, so it is skipped, and the exit status says so.
    p, calls = _run(tmp_path, "build", "test", slow_on="pip install", deadline=4, min_stage=2)
    assert p.returncode == 124
    assert "== build: TIMED OUT" in p.stdout and "== test: SKIPPED" in p.stdout
    assert not any("pytest" in a for a, _ in calls)
    summary = p.stdout[p.stdout.index("== summary"):]
    assert any(line.split()[:2] == ["test", "SKIPPED"] for line in summary.splitlines()), summary


def test_unknown_stage_exits_2_before_running_anything(tmp_path):
    p, calls = _run(tmp_path, "build", "warp-speed")
    assert p.returncode == 2 and "unknown stage 'warp-speed'" in p.stderr
    assert calls == []


def test_the_int8_anchor_stage_times_the_compact_kernels_on_demand(tmp_path):
    # Not part of `all` (the device time is short); named, it runs the shared-slot TTFT with
    # int8 anchors, which writes its own result file (result_stem: -anchors-int8).
    p, calls = _run(tmp_path, "build", "ttft-int8")
    assert p.returncode == 0, p.stdout + p.stderr
    ttft = [a for a, _ in calls if "bench ttft" in a]
    assert len(ttft) == 1 and "--share always" in ttft[0] and "--anchor-storage int8" in ttft[0]
    assert not any("--anchor-storage" in a for a, _ in _run(tmp_path, "all")[1])
