"""The server's anchor pool on disk: loaded and checked when the worker starts, saved while
it runs and when it stops.

- start: the pool file is loaded before the server takes traffic, its anchors converted to
  the served model's dtype; a file that is missing (unless `pool_new`: then the pool starts
  empty and is saved there), corrupt, or of another layout stops the worker with an error
  that says so - never the first call;
- while serving: after an engine step, when `save_every_s` seconds have passed since the last
  save and the pool changed, or `save_every_anchors` anchors were added, a background thread
  saves it (AnchorPool.save writes a temporary file and renames it: a crash never leaves a
  half-written pool; the pool's lock lets calls go on meanwhile);
- stop: a final save when vLLM shuts the connector down (SIGTERM / SIGINT end the server that
  way), and at interpreter exit as a fallback.
With tensor parallelism every rank keeps its own file ('{rank}' in the path).
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time

log = logging.getLogger("kvcomm.vllm")


class PoolStore:
    """path: the pool file (None: nothing on disk); dtype: the served model's ('float32', ...)."""

    def __init__(self, pool, path: str | None, dtype: str, *, new_ok: bool = False, every_s: float = 600.0,
                 every_anchors: int = 50, device: str = ""):
        self.pool = pool
        self.path = path
        self.every_s = float(every_s)
        self.every_anchors = int(every_anchors)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.saves = 0
        self.last_error: str | None = None
        if path is not None:
            self._open(path, dtype, new_ok, device)
            atexit.register(self.close)
        self._mark()

    def _open(self, path: str, dtype: str, new_ok: bool, device: str) -> None:
        if not os.path.exists(path):
            if not new_ok:
                raise RuntimeError(f"kvcomm: the anchor pool file {path!r} does not exist (start with --pool-new to "
                                   "begin with an empty pool that is saved there)")
            folder = os.path.dirname(os.path.abspath(path))
            if not os.access(folder, os.W_OK):
                raise RuntimeError(f"kvcomm: cannot write the anchor pool file {path!r} (folder not writable)")
            log.info("kvcomm: anchor pool %s does not exist yet: starting empty, saved there", path)
            return
        t0 = time.perf_counter()
        try:
            self.pool.load(path, device, dtype=dtype)
        except RuntimeError as e:
            raise RuntimeError(f"kvcomm: cannot use the anchor pool file {path!r}: {str(e).splitlines()[0]}") from None
        log.info("kvcomm: loaded anchor pool %s: %d anchors, %.1f MiB, as %s, in %.2f s", path, self.pool.size(),
                 self.pool.memory_bytes() / 2**20, dtype, time.perf_counter() - t0)

    def _state(self) -> tuple[int, int]:
        """(anchors ever added, a fingerprint of the contents) - cheap, read each step."""
        added = self.pool.size() + self.pool.evictions
        return added, hash((added, self.pool.memory_bytes()))

    def _mark(self) -> None:
        self._saved_at = time.monotonic()
        self._saved_added, self._saved_print = self._state()

    def maybe_save(self) -> bool:
        """Starts a background save when one is due; True when it did."""
        if self.path is None or (self._thread is not None and self._thread.is_alive()):
            return False
        added, fingerprint = self._state()
        changed = fingerprint != self._saved_print
        due = (added - self._saved_added >= self.every_anchors or
               (changed and time.monotonic() - self._saved_at >= self.every_s))
        if not due:
            return False
        self._mark()
        self._thread = threading.Thread(target=self._save_behind, name="kvcomm-pool-save", daemon=True)
        self._thread.start()
        return True

    def _save_behind(self) -> None:
        """A periodic save at the lowest CPU priority: streaming and checksumming a pool of
        gigabytes takes seconds of a core, which on a small machine the engine's steps would
        otherwise share (calls in flight slowed by seconds while it ran)."""
        lowest_priority_thread()
        self.save()

    def save(self) -> bool:
        """Saves now (one save at a time); False, logged, when it fails."""
        if self.path is None:
            return False
        with self._lock:
            try:
                t0 = time.perf_counter()
                self.pool.save(self.path)
                self.saves += 1
                log.info("kvcomm: saved the anchor pool to %s (%d anchors, %.1f MiB, %.2f s)", self.path,
                         self.pool.size(), self.pool.memory_bytes() / 2**20, time.perf_counter() - t0)
                return True
            except Exception as e:   # a full disk must not take the server down
                self.last_error = str(e).splitlines()[0]
                log.error("kvcomm: saving the anchor pool to %s failed: %s", self.path, self.last_error)
                return False

    def close(self) -> None:
        """The final save (once; waits for a background save first)."""
        if self.path is None:
            return
        t = self._thread
        if t is not None:
            t.join()
        if self._state()[1] != self._saved_print or self.saves == 0:
            self.save()
            self._mark()
        self.path = None   # closed: nothing more is saved


def lowest_priority_thread() -> bool:
    """Gives the calling thread the lowest CPU priority (nice 19), where the OS has per-thread
    priorities (Linux); False where it could not."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return True
    except (AttributeError, OSError):
        return False


_MAGIC = b"KVCOMMPL"
_DTYPES = {6: "float32", 15: "bfloat16", 5: "float16"}   # c10::ScalarType codes


def read_header(path: str) -> dict:
    """The layout a pool file holds, from its header (no tensors read): layers, kv_heads,
    head_dim, dtype, format version. ValueError when it is not a pool file."""
    import struct
    with open(path, "rb") as f:
        head = f.read(8 + 4 + 4 + 3 * 8 + 1)
    if len(head) < len(_MAGIC) or head[:8] != _MAGIC:
        raise ValueError(f"{path!r} is not a kvcomm anchor-pool file")
    if len(head) < 41:
        raise ValueError(f"{path!r} is truncated")
    version, _, layers, heads, dim, dtype = struct.unpack("<IIqqqb", head[8:41])
    return {"version": version, "layers": layers, "kv_heads": heads, "head_dim": dim,
            "dtype": _DTYPES.get(dtype, f"code {dtype}")}


def check_pool_file(path: str, *, layers: int, kv_heads: int | None, head_dim: int, new_ok: bool = False) -> str | None:
    """Why the server cannot start with this pool file, or None. kv_heads None: not checked
    (tensor parallelism: a rank holds some heads). The worker loads and checks the whole file
    again at start (checksums, every tensor); this is the quick check before vLLM starts."""
    import os
    if not os.path.exists(path):
        if new_ok:
            folder = os.path.dirname(os.path.abspath(path))
            return None if os.access(folder, os.W_OK) else f"cannot create the pool file {path!r} (folder not writable)"
        return f"the anchor pool file {path!r} does not exist (--pool-new starts an empty pool saved there)"
    try:
        h = read_header(path)
    except (OSError, ValueError) as e:
        return f"cannot use the anchor pool file: {e}"
    if h["layers"] == 0:   # an empty pool: any layout
        return None
    want = (layers, kv_heads if kv_heads is not None else h["kv_heads"], head_dim)
    got = (h["layers"], h["kv_heads"], h["head_dim"])
    if got != want:
        return (f"the anchor pool file {path!r} holds anchors of [layers={got[0]}, kv_heads={got[1]}, "
                f"head_dim={got[2]}] but the model has [layers={want[0]}, kv_heads={want[1]}, head_dim={want[2]}]")
    return None
