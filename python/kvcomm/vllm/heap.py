"""Freed heap memory handed back to the system, now and then (glibc only).

The worker allocates and frees many tensors of a few MiB each per call (read-backs of a
call's KV, staged estimates, encodings), from the engine's thread and from the background
thread that records deltas. glibc serves allocations under its (dynamic, up to 32 MiB) mmap
threshold from per-thread heaps and keeps what is freed there for reuse, so the process
keeps the peak of its transient buffers, fragmented, for good. `malloc_trim(0)` returns the
free pages of every heap; it runs at most once per `every_s` seconds (a trim costs a walk of
the heaps, and pages given back fault in again when reused). Lowering the mmap threshold
instead (MALLOC_MMAP_THRESHOLD_) made every call 15-20% slower on CPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

ENV = "KVCOMM_HEAP_TRIM_S"   # seconds between trims; 0 turns trimming off


def libc_function(name: str):
    """glibc's function `name` through ctypes, or None where it is not there (another libc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _libc_trim():
    fn = libc_function("malloc_trim")
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def rss_bytes() -> int:
    """The process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """every_s: the least time between trims (None: $KVCOMM_HEAP_TRIM_S, default 2; with the
    variable set to 0 trimming is off). slack_bytes: a trim is due only once the resident size
    has grown this much since the last one. Pages given back fault in again when reused, so
    trimming every 2 s made the next prefills' buffers fault in again and again (measured
    once: the serving benchmark's first agent 0.90x plain with it, 1.07x without trimming);
    trimming only past a slack bounds what the heap keeps at about that slack."""

    def __init__(self, every_s: float | None = None, slack_bytes: int = 256 << 20):
        env = os.environ.get(ENV)
        off = every_s is None and env is not None and float(env) <= 0
        self.every_s = float((2.0 if env is None else float(env)) if every_s is None else every_s)
        self.slack_bytes = int(slack_bytes)
        self._trim = None if off else _libc_trim()
        self._last = 0.0
        self._floor = rss_bytes()
        self._lock = threading.Lock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def due(self) -> bool:
        return (self._trim is not None and time.monotonic() - self._last >= self.every_s
                and rss_bytes() - self._floor >= self.slack_bytes)

    def maybe_trim(self) -> bool:
        """Trims when due (every_s passed and the resident size grew by slack_bytes since the
        last trim); True when it did."""
        if not self.due():
            return False
        if not self._lock.acquire(blocking=False):   # another thread is trimming
            return False
        try:
            self._last = time.monotonic()
            self._trim(0)
            self._floor = rss_bytes()
            self.trims += 1
            return True
        finally:
            self._lock.release()
