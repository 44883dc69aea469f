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
import threading
import time


def _libc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to do
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrimmer:
    def __init__(self, every_s: float = 2.0):
        self.every_s = float(every_s)
        self._trim = _libc_trim()
        self._last = 0.0
        self._lock = threading.Lock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def due(self) -> bool:
        return self._trim is not None and time.monotonic() - self._last >= self.every_s

    def maybe_trim(self) -> bool:
        """Trims when the last trim is at least every_s seconds old; True when it did."""
        if not self.due():
            return False
        if not self._lock.acquire(blocking=False):   # another thread is trimming
            return False
        try:
            self._last = time.monotonic()
            self._trim(0)
            self.trims += 1
            return True
        finally:
            self._lock.release()
