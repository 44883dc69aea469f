"""kvcomm.vllm.heap: freed heap pages handed back, at most once per interval."""
import time

from kvcomm.vllm.heap import HeapTrimmer


def test_trims_at_most_once_per_interval():
    h = HeapTrimmer(every_s=0.2, slack_bytes=0)
    assert h.available                       # the test machines run glibc
    assert h.maybe_trim() and h.trims == 1
    assert not h.maybe_trim() and h.trims == 1
    time.sleep(0.25)
    assert h.maybe_trim() and h.trims == 2


def test_trims_only_once_the_resident_size_grew_by_the_slack():
    import ctypes
    h = HeapTrimmer(every_s=0.0, slack_bytes=64 << 20)
    assert not h.due()                        # nothing grew since it was made
    held = [ctypes.create_string_buffer(1 << 20) for _ in range(96)]   # 96 MiB, touched
    assert h.due() and h.maybe_trim() and h.trims == 1
    assert not h.due()                        # the floor is the size after the trim
    del held


def test_the_variable_turns_trimming_off(monkeypatch):
    monkeypatch.setenv("KVCOMM_HEAP_TRIM_S", "0")
    assert not HeapTrimmer().available and not HeapTrimmer().maybe_trim()
    monkeypatch.setenv("KVCOMM_HEAP_TRIM_S", "5")
    assert HeapTrimmer().every_s == 5.0 and HeapTrimmer().available


_FREE_THEN_TRIM = """
import ctypes
from kvcomm.vllm.heap import HeapTrimmer

def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
h = HeapTrimmer(every_s=0.0, slack_bytes=0)
big = ctypes.create_string_buffer(8 << 20)   # freeing a mapped block raises the threshold,
del big                                      # as in a process that has run a while
bufs = [ctypes.create_string_buffer(1 << 20) for _ in range(200)]   # 200 MiB from the heap
pins = [ctypes.create_string_buffer(1 << 12) for _ in range(200)]   # live blocks above them
before = rss()
del bufs
kept = rss()
assert kept > before - (50 << 20), ("freed, but still the process's", before, kept)
assert h.maybe_trim()
assert rss() < kept - (150 << 20), (before, kept, rss())
"""


def test_freed_buffers_leave_the_process():
    """Mid-sized buffers under glibc's (raised) mmap threshold, freed below live ones: glibc
    keeps their pages; a trim gives them back. In a fresh interpreter: what the heap looks
    like after other tests have run decides whether glibc keeps the pages on its own."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _FREE_THEN_TRIM], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
