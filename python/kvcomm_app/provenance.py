"""Where a results file came from: the commit, whether the tree had uncommitted changes,
the command that reruns it, and the machine it ran on.

Every results writer (`kvcomm demo/eval/bench`, the benchmark scripts, the analysis
scripts) takes these from here, so `git_sha`, `git_dirty` and `command` mean the same in
every file under results/ whichever program wrote it. Capture them before a long run
starts: the tree may be committed or edited while it runs, and the file must name the
code that was measured.

Nothing here imports torch at module level: the analysis scripts that only read records
use it too.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass

_HERE = os.path.dirname(os.path.abspath(__file__))


def _git(*args: str) -> str | None:
    """git's output in the checkout this code runs from; None outside one or without git."""
    try:
        out = subprocess.run(["git", "-C", _HERE, *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_sha() -> str | None:
    """HEAD of the checkout; None when the code does not run from one."""
    out = _git("rev-parse", "HEAD")
    return (out or "").strip() or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (untracked files do not run, so they do not
    count); None when the code does not run from a checkout."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def command(*program: str, argv: list[str] | None = None) -> str:
    """The shell line that reruns this: `program` (`"kvcomm"`, or `"python",
    "benchmarks/soak.py"`) and then argv (None: this process's own arguments), quoted so
    that it runs when pasted (a --paired-variant "a=1 b=2" stays one argument)."""
    return shlex.join([*program, *(sys.argv[1:] if argv is None else argv)])


@dataclass(frozen=True)
class Provenance:
    """What one results file records about its own making."""

    git_sha: str | None
    git_dirty: bool | None
    command: str

    def fields(self) -> dict:
        """The three fields under the names results files use."""
        return {"git_sha": self.git_sha, "git_dirty": self.git_dirty, "command": self.command}

    @property
    def marked_sha(self) -> str:
        """One string for both facts, as benchmarks/ops.py has always recorded `git_sha`:
        the sha, `-dirty` appended when the tree had changes, `unknown` outside a checkout."""
        if self.git_sha is None:
            return "unknown"
        return self.git_sha + ("-dirty" if self.git_dirty else "")


def capture(*program: str, argv: list[str] | None = None) -> Provenance:
    """The provenance of the run about to start (see `command` for the arguments)."""
    return Provenance(git_sha(), git_dirty(), command(*program, argv=argv))


def device_detail(device: str, dtype) -> str:
    """The `device_detail` of a results file: `cpu, float32, torch 2.13.0+cpu, 1 threads,
    2 cores, x86_64`; on CUDA the GPU's name instead of the cores and the machine. dtype:
    its name or the torch.dtype itself."""
    import torch

    dtype = str(dtype).removeprefix("torch.")
    out = f"{device}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.device(device).type == "cuda":
        return out + f", {torch.cuda.get_device_name(torch.device(device))}"
    return out + f", {os.cpu_count()} cores, {platform.machine()}"


def package_version(name: str) -> str | None:
    """An installed distribution's version (`transformers`), None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, rounded to 0.01: other work on a small
    machine moves every CPU timing, so timing files record it. None where the system
    does not report one."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def load_1m() -> float | None:
    """The 1-minute load average alone (per-row and per-phase records)."""
    load = load_average()
    return None if load is None else load[0]
