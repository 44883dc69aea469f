"""Where the worker's memory is: what KVCOMM holds, by part, beside the process's resident
size and glibc's view of its heaps. Set KVCOMM_MEMORY_LOG=<file> and the worker appends one
JSON line per heap trim (at most every 2 s) to it; `kvcomm serve` operators and the serving
benchmark use it to tell what KVCOMM holds from what the allocator keeps."""
from __future__ import annotations

import ctypes
import json
import os
import time

from .heap import libc_function, rss_bytes

ENV = "KVCOMM_MEMORY_LOG"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    fn = libc_function("mallinfo2")
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_numbers() -> dict:
    """glibc's heap totals (bytes): in use by live allocations (main and thread heaps, plus
    mmapped blocks) and free inside the heaps; {} where mallinfo2 is not there."""
    if _MALLINFO2 is None:
        return {}
    m = _MALLINFO2()
    return {"heap_in_use": int(m.uordblks), "heap_free": int(m.fordblks), "mmapped": int(m.hblkhd),
            "heaps_total": int(m.arena)}


def memory_report(state) -> dict:
    """kvcomm.vllm.worker_state.WorkerState's parts (bytes) and the process's numbers."""
    from ..plan.state import tensor_bytes
    sessions = state.sessions.all()
    return {"t": round(time.time(), 3), "rss": rss_bytes(), **heap_numbers(),
            "pool": state.pool.memory_bytes(), "pool_anchors": state.pool.size(),
            "sessions": len(sessions), "sessions_counted": state.sessions.bytes,
            "sessions_now": tensor_bytes(*sessions),
            "staged": len(state.staged), "staged_bytes": tensor_bytes(state.staged),
            "pending": len(state.pending), "pending_bytes": tensor_bytes([p for p, _ in state.pending.values()]),
            "templates": len(state.agents), "template_bytes": tensor_bytes(list(state.agents.values()))}


class MemoryLog:
    """Appends memory_report lines to the file named by $KVCOMM_MEMORY_LOG (no-op without it)."""

    def __init__(self, path: str | None = None):
        self.path = path if path is not None else os.environ.get(ENV) or None

    def write(self, state) -> None:
        if not self.path:
            return
        try:   # diagnostics never fail the worker's work
            line = json.dumps(memory_report(state))
        except Exception as e:   # e.g. a session changed while it was counted
            line = json.dumps({"t": round(time.time(), 3), "error": repr(e)})
        with open(self.path, "a") as f:
            f.write(line + "\n")
