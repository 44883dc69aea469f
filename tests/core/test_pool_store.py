"""The server's pool on disk (kvcomm.vllm.pool_store, no vLLM needed): refused at start when it
cannot be used, converted to the served dtype, saved in the background when due, and once more
when the server stops."""
import time

import pytest
import torch

import kvcomm
from kvcomm.vllm.pool_store import PoolStore, check_pool_file, read_header


def pool(layers=2, **kw):
    return kvcomm.AnchorPool(kvcomm.PoolConfig(layers=layers, kv_heads=2, head_dim=8, **kw))


def filled(n=3, dtype=torch.float32):
    p = pool()
    for i in range(n):
        p.add_anchor("q", torch.randn(2, 2, 4, 8, dtype=dtype), torch.randn(2, 2, 4, 8, dtype=dtype))
    return p


def test_a_missing_file_is_an_error_unless_a_new_pool_is_asked_for(tmp_path):
    path = str(tmp_path / "pool.bin")
    with pytest.raises(RuntimeError, match="does not exist"):
        PoolStore(pool(), path, "float32")
    store = PoolStore(pool(), path, "float32", new_ok=True)
    assert store.pool.size() == 0
    store.close()                                   # the empty pool is written: the next start finds it
    assert read_header(path)["layers"] == 2
    assert PoolStore(pool(), path, "float32").pool.size() == 0


def test_corrupt_and_mismatched_files_are_refused(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"KVCOMMPL" + b"\0" * 64)
    with pytest.raises(RuntimeError, match="cannot use the anchor pool file"):
        PoolStore(pool(), str(bad), "float32")
    other = kvcomm.AnchorPool(kvcomm.PoolConfig())
    other.add_anchor("q", torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8))
    other.save(str(tmp_path / "other.bin"))
    with pytest.raises(RuntimeError, match=r"holds anchors of \[layers=3"):
        PoolStore(pool(), str(tmp_path / "other.bin"), "float32")
    assert "layers=3" in check_pool_file(str(tmp_path / "other.bin"), layers=2, kv_heads=2, head_dim=8)


def test_a_float32_pool_loads_into_a_bfloat16_server(tmp_path):
    path = str(tmp_path / "pool.bin")
    filled().save(path)
    store = PoolStore(pool(), path, "bfloat16")
    assert store.pool.size() == 3 and store.pool.dtype == "bfloat16"
    assert store.pool.decide("q", torch.randn(2, 2, 4, 8, dtype=torch.bfloat16)).candidates


def test_saves_when_due_in_the_background_and_on_close(tmp_path):
    path = str(tmp_path / "pool.bin")
    store = PoolStore(pool(), path, "float32", new_ok=True, every_s=3600, every_anchors=2)
    p = store.pool
    p.add_anchor("q", torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    assert not store.maybe_save()                   # 1 new anchor, the hour not over: not due
    p.add_anchor("q", torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    assert store.maybe_save()                       # 2 new anchors: saved in the background
    store._thread.join()
    assert store.saves == 1
    check = pool()
    check.load(path)
    assert check.size() == 2
    store.every_s = 0.0                             # time-based: due when the pool changed
    assert not store.maybe_save()                   # unchanged since the last save
    p.add_anchor("q", torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    time.sleep(0.01)
    assert store.maybe_save()
    store._thread.join()
    p.add_anchor("q", torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    store.close()                                   # the final save holds everything
    check.load(path)
    assert check.size() == 4
    assert not store.maybe_save()                   # closed: nothing more is written


def test_a_periodic_save_runs_at_the_lowest_cpu_priority(tmp_path, monkeypatch):
    import os
    import threading

    seen = {}
    real_save = PoolStore.save

    def save(self):
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return real_save(self)
    monkeypatch.setattr(PoolStore, "save", save)
    store = PoolStore(pool(), str(tmp_path / "pool.bin"), "float32", new_ok=True, every_anchors=1)
    store.pool.add_anchor("q", torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    assert store.maybe_save()
    store._thread.join()
    assert seen["nice"] == 19 and store.saves == 1
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19   # only that thread
