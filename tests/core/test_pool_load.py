"""AnchorPool under load: 16 threads of agents inserting, recording,
deciding, estimating and evicting against one pool for a bounded time.

KVCOMM_LOAD_SECONDS sets the duration (CI default 4 s; e.g. 120 for a soak).
Prints the operations per second it reached."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest
import torch

import kvcomm

L, H, D = 4, 2, 32
SECONDS = float(os.environ.get("KVCOMM_LOAD_SECONDS", "4"))
THREADS = 16


def constant(tokens: int, value: float) -> torch.Tensor:
    return torch.full((L, H, tokens, D), value)


def test_pool_under_load_stays_consistent():
    anchor_bytes = constant(8, 0).nbytes * 2
    delta_bytes = constant(8, 0).nbytes * 2
    budget = 40 * (anchor_bytes + delta_bytes)
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig(capacity=8, window=3, byte_budget=budget, tau=0.5))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    stop = time.monotonic() + SECONDS
    ops_done = [0] * THREADS
    errors: list[str] = []
    max_bytes = [0]

    def agent(t: int):
        rng = random.Random(t)
        try:
            while time.monotonic() < stop:
                slot = f"slot{rng.randrange(4)}"
                value = rng.uniform(-1, 1)
                tokens = rng.randrange(4, 9)
                op = rng.random()
                if op < 0.3:
                    # Anchors hold constant tensors: base = value, deltas = value/10,
                    # so a torn (half-written) anchor is detectable downstream.
                    aid = pool.add_anchor(slot, constant(tokens, value), constant(tokens, value))
                    try:
                        pool.record_deltas(slot, aid, f"agent{t % 4}", constant(tokens, value / 10),
                                           constant(tokens, value / 10))
                    except RuntimeError as e:
                        if "no anchor with id" not in str(e):  # evicted meanwhile is fine
                            raise
                elif op < 0.6:
                    pool.decide(slot, constant(tokens, value), credit=True)
                else:
                    base = constant(tokens, value)
                    dst_k, dst_v = torch.zeros_like(base), torch.zeros_like(base)
                    res = pool.estimate(slot, f"agent{t % 4}", base, base, inv_freq, 0, dst_k, dst_v)
                    if res:
                        offset = dst_v[1:] - base[1:]
                        # Per token the offset is a convex mix of constant deltas:
                        # constant over layers, heads and channels, within [-0.1, 0.1].
                        per_token = offset.permute(2, 0, 1, 3).reshape(tokens, -1)
                        assert torch.allclose(per_token, per_token[:, :1].expand_as(per_token), atol=1e-6), \
                            "estimate read an inconsistent anchor"
                        assert per_token.abs().max() <= 0.1 + 1e-6
                        assert torch.equal(dst_v[0], base[0])  # layer 0 untouched by deltas
                ops_done[t] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {t}: {e!r}")

    def monitor():
        while time.monotonic() < stop:
            max_bytes[0] = max(max_bytes[0], pool.memory_bytes())
            time.sleep(0.001)

    threads = [threading.Thread(target=agent, args=(t,)) for t in range(THREADS)]
    threads.append(threading.Thread(target=monitor))
    start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - start
    total = sum(ops_done)
    print(f"\npool load: {THREADS} threads, {total} operations in {elapsed:.1f} s = {total / elapsed:.0f} ops/s, "
          f"{pool.size()} anchors, {pool.evictions} evictions, max {max_bytes[0]} of {budget} bytes")

    assert not errors, errors[:3]
    assert total > THREADS
    assert max_bytes[0] <= budget and pool.memory_bytes() <= budget
    for slot in pool.slots():
        assert pool.slot_size(slot) <= 8
        for a in pool.anchors(slot):
            bk, bv = pool.anchor_base(slot, a.id)
            value = bk.flatten()[0]
            assert torch.equal(bk, torch.full_like(bk, value)) and torch.equal(bk, bv)
            for agent_name in a.agents:
                d = pool.anchor_deltas(slot, a.id, agent_name)
                assert torch.allclose(d["ph_v"], torch.full_like(bk, value / 10))
    assert pool.memory_bytes() == sum(a.bytes for s in pool.slots() for a in pool.anchors(s))


@pytest.mark.parametrize("storage", ["model", "bf16", "int8", "fp8"])
def test_load_converts_to_the_servers_dtype(tmp_path, storage):
    """A pool saved under a float32 model loads into a bfloat16 one with dtype='bfloat16'
    (refused without it): decisions and estimates then run on the new dtype at once."""
    torch.manual_seed(0)
    src = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage))
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    a = src.add_anchor("q", k, v)
    src.record_deltas("q", a, "x", torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    path = str(tmp_path / "pool.bin")
    src.save(path)
    busy = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage))
    busy.add_anchor("z", k.bfloat16(), v.bfloat16())
    with pytest.raises(RuntimeError, match="holds Float anchors but this pool holds BFloat16"):
        busy.load(path)
    assert busy.size() == 1   # unchanged
    dst = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage))
    dst.load(path, dtype="bfloat16")
    assert src.dtype == "float32" and dst.dtype == "bfloat16"
    base = dst.anchor_base("q", a)[1]
    assert base.dtype == torch.bfloat16
    torch.testing.assert_close(base.float(), src.anchor_base("q", a)[1].float(), atol=0.02, rtol=0.02)
    assert dst.anchor_deltas("q", a, "x")["ph_v"].dtype == torch.bfloat16
    assert dst.decide("q", v.bfloat16()).candidates == [a]
    with pytest.raises(RuntimeError, match="dtype must be"):
        dst.load(path, dtype="int8")
