"""The worker's memory report ($KVCOMM_MEMORY_LOG): what KVCOMM holds, by part, beside the
process's resident size, one JSON line per report."""
import json
from types import SimpleNamespace

import torch

from kvcomm import AnchorPool, PoolConfig
from kvcomm.vllm.memory_report import ENV, MemoryLog, memory_report
from kvcomm.vllm.worker_state import WorkerState

SPEC = SimpleNamespace(inv_freq=torch.ones(4), exact_positions=None, rope_type="default")


def test_the_report_counts_each_part_of_the_worker_state():
    pool = AnchorPool(PoolConfig())
    pool.add_anchor("s", torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8))   # 2 x 1 KiB
    ws = WorkerState(SPEC, pool)
    ws.staged["r1"] = (torch.zeros(2, 2, 32, 8), torch.zeros(2, 2, 32, 8))     # 2 x 4 KiB
    ws.session("a").encoded[("question", (1, 2))] = (torch.zeros(1024), torch.zeros(1024))   # 2 x 4 KiB
    r = memory_report(ws)
    assert r["pool"] == pool.memory_bytes() >= 2048 and r["pool_anchors"] == 1
    assert r["staged"] == 1 and r["staged_bytes"] == 8192
    assert r["sessions"] == 1 and r["sessions_now"] == 8192 and r["pending"] == 0
    assert r["rss"] > 0 and r["rss"] >= r.get("heap_in_use", 0) // 4


def test_the_log_appends_json_lines_only_when_asked(tmp_path, monkeypatch):
    ws = WorkerState(SPEC, AnchorPool(PoolConfig()))
    monkeypatch.delenv(ENV, raising=False)
    MemoryLog().write(ws)   # no file named: nothing written, nothing raised
    path = tmp_path / "mem.jsonl"
    monkeypatch.setenv(ENV, str(path))
    log = MemoryLog()
    log.write(ws)
    log.write(ws)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2 and {"rss", "pool", "sessions_now", "staged_bytes"} <= set(lines[0])
