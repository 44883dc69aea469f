"""benchmarks/gpu_session.sh, the one-call plan for a session with a lent GPU: its
control flow, checked here with a stand-in Python that records what it is asked to
run (the real stages need a GPU)."""
from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"

FAKE_PY = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && exit 3 ;; esac
case "$*" in *"$SLOW_ON"*) [ -n "$SLOW_ON" ] && sleep 30 ;; esac
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
               CALLS=str(calls),
               FAIL_ON=fail_on, SLOW_ON=slow_on)
    if deadline is not None:
        env["KVCOMM_GPU_DEADLINE_S"] = str(deadline)
    if min_stage is not None:
        env["KVCOMM_GPU_MIN_STAGE_S"] = str(min_stage)
    p = subprocess.run(["bash", str(SCRIPT), *stages], env=env, capture_output=True, text=True, timeout=120)
    # "-c ..." and "-" (a script on stdin) are the plan's own checks, not stages
    lines = [c for c in calls.read_text().splitlines() if not c.startswith("-c ") and c != "-"]
    return p, lines


def test_all_runs_every_stage_in_priority_order(tmp_path):
    p, calls = _run(tmp_path, "all")
    assert p.returncode == 0, p.stdout + p.stderr
    kinds = [("pip install" in c and "build") or ("pytest" in c and "test") or ("benchmarks/ops.py" in c and "ops")
             or ("--scaling" in c and "scaling") or ("--share always" in c and "ttft-share")
             or ("bench ttft" in c and "ttft") for c in calls]
    assert kinds == ["build", "ops", "ttft-share", "test", "ttft", "scaling", "scaling"]
    assert "== done" in p.stdout
    # $OUT holds one archive (the device tool brings back at most 8 files) with every log
    with tarfile.open(tmp_path / "out" / "gpu-session.tgz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "gpu-session.tgz"]
    assert {"gpu.txt", "build.log", "ops.log", "ttft-share.log", "test.log", "ttft.log",
            "scaling-agents.log", "scaling-prefix.log"} <= names


def test_a_failing_stage_is_reported_and_the_rest_still_run(tmp_path):
    p, calls = _run(tmp_path, "build", "ops", "ttft", fail_on="benchmarks/ops.py")
    assert p.returncode == 3
    assert "== ops: FAILED (exit 3)" in p.stdout and "== ttft: ok" in p.stdout
    assert any("bench ttft" in c for c in calls)


def test_stages_stop_at_the_deadline(tmp_path):
    # build is cut off by the deadline (30 s sleep, 4 s deadline); nothing after it
    # has the 2 s a stage needs here, so it is skipped, and the exit status says so.
    p, calls = _run(tmp_path, "build", "ops", slow_on="pip install", deadline=4, min_stage=2)
    assert p.returncode == 124
    assert "== build: TIMED OUT" in p.stdout and "== ops: SKIPPED" in p.stdout
    assert not any("ops.py" in c for c in calls)


def test_unknown_stage_exits_2_before_running_anything(tmp_path):
    p, calls = _run(tmp_path, "build", "warp-speed")
    assert p.returncode == 2 and "unknown stage 'warp-speed'" in p.stderr
    assert calls == []
