"""Run untrusted model-written Python in a child process: time limit, no network.

Agents write code (the math programming expert, the HumanEval writers); the runtime
executes it to turn it into a tool result. This is containment for a cooperative
model's mistakes (infinite loops, huge allocations, stray network calls), not a
security boundary against a hostile one.

How the child is fenced in:
- its own process group, killed as a whole at the deadline (so forks die too);
- a fresh network namespace when the kernel allows it (root or user namespaces),
  which leaves only a downed loopback; and, always, `socket` functions that raise;
- resource limits on CPU seconds, address space, file size and open files;
- `python -I` (no user site, no PYTHON* variables) in an empty temporary folder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, asdict

# Executed in the child before the user's code. Kept self-contained on purpose: the
# child imports nothing from kvcomm.
_PRELUDE = r'''
import ctypes, resource, socket, sys

def _fence(limit_s, mem_bytes):
    try:  # CLONE_NEWNET: a namespace whose only interface is a downed loopback
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
            pass  # not permitted here: the socket guard below still applies
    except Exception:
        pass
    def _blocked(*a, **k):
        raise OSError("network access is disabled in the kvcomm sandbox")
    socket.socket = _blocked
    socket.create_connection = _blocked
    socket.getaddrinfo = _blocked
    for res, val in ((resource.RLIMIT_CPU, limit_s), (resource.RLIMIT_AS, mem_bytes),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64)):
        try:
            resource.setrlimit(res, (val, val))
        except Exception:
            pass

_fence(__CPU__, __MEM__)
del _fence
__code = sys.stdin.read()
__globals = {"__name__": "__main__"}
exec(compile(__code, "<agent code>", "exec"), __globals)
'''


@dataclass
class SandboxResult:
    """What one execution produced. `ok` means it ran to completion with exit code 0."""
    ok: bool
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    duration_ms: float

    @property
    def error(self) -> str:
        """The last line of the traceback (e.g. 'ZeroDivisionError: division by zero'),
        'timed out after ...' or '' when the code succeeded."""
        if self.timed_out:
            return f"timed out after {self.duration_ms / 1000:.1f} s"
        if self.ok:
            return ""
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit code {self.returncode}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error"] = self.error
        return d


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 1024,
               max_output_chars: int = 4000) -> SandboxResult:
    """Execute `code` in a fenced child Python and capture its output.

    stdout/stderr are truncated to `max_output_chars` each (kept from the end for
    stderr, where the exception is). Never raises for anything the code does.
    """
    prelude = (_PRELUDE.replace("__CPU__", str(max(1, int(timeout_s) + 1)))
               .replace("__MEM__", str(int(memory_mb) << 20)))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvcomm-sandbox-") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-c", prelude], cwd=cwd, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(code.encode("utf-8"), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt while waiting
                _kill_group(proc)
                proc.wait()
    duration_ms = (time.perf_counter() - start) * 1000.0
    rc = proc.returncode
    return SandboxResult(ok=(not timed_out and rc == 0),
                         stdout=out.decode("utf-8", "replace")[:max_output_chars],
                         stderr=err.decode("utf-8", "replace")[-max_output_chars:],
                         returncode=rc, timed_out=timed_out, duration_ms=duration_ms)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
