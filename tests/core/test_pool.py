"""kvcomm.AnchorPool: decisions, estimation vs the reference, eviction,
byte budget, save/load and concurrent use."""
from __future__ import annotations

import os
import threading

import pytest
import torch
from torch.testing import assert_close

import kvcomm
from kvcomm import reference as ref
from rope_freqs import inv_freq

L, H, D = 3, 2, 64


def kv(tokens, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, H, tokens, D, generator=g) * scale).to(dtype)


def pool(**cfg) -> kvcomm.AnchorPool:
    return kvcomm.AnchorPool(kvcomm.PoolConfig(**cfg))


def test_defaults_follow_the_spec():
    c = kvcomm.PoolConfig()
    assert (c.gamma, c.tau, c.top_p, c.capacity, c.window, c.distance) == (0.3, 1.0, 0.9, 20, 5, "frobenius")


def test_cold_start_needs_two_anchors():
    p = pool()
    content = kv(6, 0)
    assert p.decide("q", content).reason == "too_few_candidates"
    p.add_anchor("q", content, content)
    d = p.decide("q", content)
    assert not d.share and d.reason == "too_few_candidates" and d.candidates == [0]


def test_share_credits_the_close_anchor():
    p = pool()
    close = kv(8, 1)
    a = p.add_anchor("q", close, close)
    b = p.add_anchor("q", kv(8, 2), kv(8, 2))
    d = p.decide("q", close[:, :, :6] + 1e-3)
    assert d.share and d.reason == "share" and d.credited == [a]
    assert d.entropy <= d.threshold
    acts = {x.id: x.activations for x in p.anchors("q")}
    assert acts == {a: 1, b: 0}
    # credit=False decides without touching activations.
    p.decide("q", close[:, :, :6], credit=False)
    assert {x.id: x.activations for x in p.anchors("q")} == acts


def test_candidates_must_be_long_enough():
    p = pool()
    p.add_anchor("q", kv(4, 1), kv(4, 1))
    p.add_anchor("q", kv(9, 2), kv(9, 2))
    assert p.decide("q", kv(6, 3)).candidates == [1]


def test_rms_mode_is_scale_free():
    # With raw Frobenius distances over many elements p is one-hot; RMS keeps
    # the same ranking on a per-element scale.
    p = pool(distance="rms", gamma=0.9)
    a = p.add_anchor("q", kv(8, 1), kv(8, 1))
    p.add_anchor("q", kv(8, 2), kv(8, 2))
    d = p.decide("q", kv(8, 1) + 0.01)
    assert d.distances[0] < 0.02 and d.distances[1] > 1.0


def _anchor_with_deltas(p, slot, seed, agent="a", seg_len=5):
    base = kv(7, seed)
    aid = p.add_anchor(slot, base, base * 0.5)
    p.record_deltas(slot, aid, agent, kv(7, seed + 100, 0.1), kv(7, seed + 200, 0.1),
                    kv(seg_len, seed + 300, 0.1), kv(seg_len, seed + 400, 0.1))
    return aid


def test_estimate_matches_reference():
    p = pool(tau=0.8)
    ids = [_anchor_with_deltas(p, "q", s) for s in (1, 2, 3)]
    base_k, base_v = kv(6, 9), kv(6, 10)
    seg_k, seg_v = kv(5, 11), kv(5, 12)
    f = inv_freq(D)
    buf_k, buf_v = torch.zeros(L, H, 40, D), torch.zeros(L, H, 40, D)
    res = p.estimate("q", "a", base_k, base_v, f, 20, buf_k[:, :, 20:26], buf_v[:, :, 20:26],
                     seg_template_k=seg_k, seg_template_v=seg_v, seg_position=26,
                     seg_dst_k=buf_k[:, :, 26:31], seg_dst_v=buf_v[:, :, 26:31])
    assert res.ok and res.anchors == ids
    anchors = []
    for i in ids:
        bk, bv = p.anchor_base("q", i)
        anchors.append(dict(base_k=bk, base_v=bv, **p.anchor_deltas("q", i, "a")))
    k, v, sk, sv = ref.estimate(anchors, base_k, base_v, f, 20, 0.8, seg_k, seg_v, 26)
    assert_close(buf_k[:, :, 20:26], k)
    assert_close(buf_v[:, :, 20:26], v)
    assert_close(buf_k[:, :, 26:31], sk)
    assert_close(buf_v[:, :, 26:31], sv)
    assert not buf_k[:, :, :20].any() and not buf_k[:, :, 31:].any()


def test_estimate_skips_anchors_without_the_agents_deltas():
    p = pool()
    a = _anchor_with_deltas(p, "q", 1, agent="a")
    _anchor_with_deltas(p, "q", 2, agent="b")
    dst = torch.zeros(L, H, 6, D)
    res = p.estimate("q", "a", kv(6, 3), kv(6, 4), inv_freq(D), 0, dst, dst.clone())
    assert res.anchors == [a]
    dst2 = torch.zeros(L, H, 6, D)
    res = p.estimate("q", "nobody", kv(6, 3), kv(6, 4), inv_freq(D), 0, dst2, dst2.clone())
    assert not res and not dst2.any()
    res = p.estimate("unknown-slot", "a", kv(6, 3), kv(6, 4), inv_freq(D), 0, dst2, dst2.clone())
    assert not res and not dst2.any()


def test_estimate_requires_matching_segment_length():
    p = pool()
    _anchor_with_deltas(p, "q", 1, seg_len=5)
    z = torch.zeros(L, H, 4, D)
    res = p.estimate("q", "a", kv(6, 3), kv(6, 4), inv_freq(D), 0, torch.zeros(L, H, 6, D),
                     torch.zeros(L, H, 6, D), seg_template_k=kv(4, 5), seg_template_v=kv(4, 6),
                     seg_position=6, seg_dst_k=z, seg_dst_v=z.clone())
    assert not res


def test_capacity_evicts_least_activated_of_the_oldest_window():
    p = pool(capacity=4, window=2)
    ids = [p.add_anchor("q", kv(5, s), kv(5, s)) for s in range(4)]
    # Give the oldest anchor activations so the second-oldest is the victim.
    d = None
    for _ in range(3):
        d = p.decide("q", kv(5, 0), credit=True)
    assert d.share and d.credited == [ids[0]]
    p.add_anchor("q", kv(5, 10), kv(5, 10))
    left = [a.id for a in p.anchors("q")]
    assert ids[1] not in left and ids[0] in left and len(left) == 4
    assert p.evictions == 1
    # Next eviction: window = {ids[0] (3 activations), ids[2] (0)} -> ids[2].
    p.add_anchor("q", kv(5, 11), kv(5, 11))
    assert ids[2] not in [a.id for a in p.anchors("q")]


def test_capacity_ties_evict_the_oldest():
    p = pool(capacity=2, window=5)
    ids = [p.add_anchor("q", kv(5, s), kv(5, s)) for s in range(3)]
    assert [a.id for a in p.anchors("q")] == ids[1:]


def test_byte_budget_is_never_exceeded():
    one = kv(5, 0).nbytes * 2
    p = pool(byte_budget=3 * one)
    for s in range(10):
        p.add_anchor(f"slot{s % 3}", kv(5, s), kv(5, s))
        assert p.memory_bytes() <= 3 * one
    assert p.size() == 3 and p.evictions == 7
    with pytest.raises(RuntimeError, match="byte budget"):
        pool(byte_budget=one - 1).add_anchor("q", kv(5, 0), kv(5, 0))


def test_record_deltas_over_budget_is_rejected_and_leaves_pool_unchanged():
    one = kv(5, 0).nbytes * 2
    p = pool(byte_budget=int(1.5 * one))
    aid = p.add_anchor("q", kv(5, 0), kv(5, 0))
    with pytest.raises(RuntimeError, match="byte budget"):
        p.record_deltas("q", aid, "a", kv(5, 1), kv(5, 1))
    assert not p.has_deltas("q", aid, "a") and p.memory_bytes() == one


def test_memory_bytes_counts_bases_and_deltas():
    p = pool()
    aid = p.add_anchor("q", kv(5, 0), kv(5, 0))
    p.record_deltas("q", aid, "a", kv(5, 1), kv(5, 1), kv(3, 2), kv(3, 2))
    assert p.memory_bytes() == kv(5, 0).nbytes * 4 + kv(3, 0).nbytes * 2


def test_inputs_are_copied():
    p = pool()
    base = kv(5, 0)
    aid = p.add_anchor("q", base, base)
    base.zero_()
    assert p.anchor_base("q", aid)[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    p = pool()
    a = p.add_anchor("user_question", kv(5, 0, dtype=dtype), kv(5, 1, dtype=dtype))
    p.record_deltas("user_question", a, "agent_1", kv(5, 2, dtype=dtype), kv(5, 3, dtype=dtype),
                    kv(4, 4, dtype=dtype), kv(4, 5, dtype=dtype))
    b = p.add_anchor("agent_1_current", kv(9, 6, dtype=dtype), kv(9, 7, dtype=dtype))
    p.record_deltas("agent_1_current", b, "agent_2", kv(9, 8, dtype=dtype), kv(9, 9, dtype=dtype))
    p.add_anchor("user_question", kv(5, 10, dtype=dtype), kv(5, 10, dtype=dtype))
    p.decide("user_question", kv(5, 1, dtype=dtype))
    path = str(tmp_path / "pool.kvc")
    p.save(path)
    assert not os.path.exists(path + ".tmp")
    q = pool()
    q.load(path)
    assert q.slots() == p.slots() and q.memory_bytes() == p.memory_bytes()
    for slot in p.slots():
        for x, y in zip(p.anchors(slot), q.anchors(slot)):
            assert (x.id, x.length, x.activations, x.inserted, x.agents) == (y.id, y.length, y.activations, y.inserted, y.agents)
            for t1, t2 in zip(p.anchor_base(slot, x.id), q.anchor_base(slot, y.id)):
                assert t1.dtype == t2.dtype and torch.equal(t1, t2)
            for agent in x.agents:
                d1, d2 = p.anchor_deltas(slot, x.id, agent), q.anchor_deltas(slot, x.id, agent)
                for key in d1:
                    assert (d1[key] is None and d2[key] is None) or torch.equal(d1[key], d2[key])
    # New ids continue after the loaded ones.
    assert q.add_anchor("user_question", kv(5, 11, dtype=dtype), kv(5, 11, dtype=dtype)) > b


def test_load_rejects_bad_files_and_keeps_the_live_pool(tmp_path):
    p = pool()
    p.add_anchor("q", kv(5, 0), kv(5, 0))
    good = str(tmp_path / "good.kvc")
    p.save(good)
    data = open(good, "rb").read()
    live = pool()
    live.add_anchor("keep", kv(6, 1), kv(6, 1))
    bad = tmp_path / "bad.kvc"
    cases = {
        "truncated|corrupted": data[: len(data) // 2],
        "corrupted": data[:40] + bytes([data[40] ^ 0xFF]) + data[41:],
        "not a kvcomm": b"hello world, not a pool at all",
        "version": data[:8] + (99).to_bytes(4, "little") + data[12:],
    }
    for message, blob in cases.items():
        bad.write_bytes(blob)
        with pytest.raises(RuntimeError, match=message):
            live.load(str(bad))
        assert live.slots() == ["keep"] and live.size() == 1
    with pytest.raises(RuntimeError, match="cannot open"):
        live.load(str(tmp_path / "missing.kvc"))
    # A pool of another model shape is rejected.
    other = kvcomm.AnchorPool(kvcomm.PoolConfig())
    other.add_anchor("q", torch.zeros(2, 2, 5, 64), torch.zeros(2, 2, 5, 64))
    other_path = str(tmp_path / "other.kvc")
    other.save(other_path)
    with pytest.raises(RuntimeError, match="this pool is for"):
        live.load(other_path)
    assert live.slots() == ["keep"]


def test_concurrent_use_from_eight_threads():
    p = pool(capacity=6, window=3)
    f = inv_freq(D)
    errors = []
    per_thread = 25

    def worker(t):
        try:
            for i in range(per_thread):
                slot = f"s{(t + i) % 3}"
                seed = t * 1000 + i
                base = kv(6, seed)
                aid = p.add_anchor(slot, base, base)
                try:
                    p.record_deltas(slot, aid, f"agent{t}", kv(6, seed + 1, 0.1), kv(6, seed + 2, 0.1))
                except RuntimeError as e:  # evicted by another thread meanwhile
                    assert "no anchor with id" in str(e)
                p.decide(slot, kv(6, seed + 3))
                dst_k, dst_v = torch.zeros(L, H, 6, D), torch.zeros(L, H, 6, D)
                res = p.estimate(slot, f"agent{t}", base, base, f, 3, dst_k, dst_v)
                if res:
                    assert torch.isfinite(dst_k).all() and dst_k.abs().sum() > 0
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert all(p.slot_size(s) <= 6 for s in p.slots())
    assert p.size() + p.evictions == 8 * per_thread
    # Every anchor still holds exactly what was inserted for it.
    for slot in p.slots():
        for a in p.anchors(slot):
            bk, bv = p.anchor_base(slot, a.id)
            assert torch.equal(bk, bv) and bk.shape == (L, H, 6, D)
    expected = sum(a.bytes for s in p.slots() for a in p.anchors(s))
    assert p.memory_bytes() == expected


@pytest.mark.parametrize("call,match", [
    (lambda p: p.add_anchor("q", torch.zeros(2, 5, 64), torch.zeros(2, 5, 64)), "4-D"),
    (lambda p: p.add_anchor("q", torch.zeros(2, 2, 5, 64, dtype=torch.int32),
                            torch.zeros(2, 2, 5, 64, dtype=torch.int32)), "float32, bfloat16 or float16"),
    (lambda p: p.add_anchor("q", torch.zeros(2, 2, 5, 64), torch.zeros(2, 2, 6, 64)), "base_v has shape"),
    (lambda p: p.add_anchor("q", torch.zeros(2, 2, 5, 64), torch.zeros(2, 2, 5, 64, dtype=torch.float16)), "base_v is"),
    (lambda p: p.add_anchor("", torch.zeros(2, 2, 5, 64), torch.zeros(2, 2, 5, 64)), "slot name is empty"),
    (lambda p: p.record_deltas("nope", 0, "a", torch.zeros(3, 2, 5, 64), torch.zeros(3, 2, 5, 64)), "unknown slot 'nope'"),
    (lambda p: p.record_deltas("q", 999, "a", torch.zeros(3, 2, 5, 64), torch.zeros(3, 2, 5, 64)), "no anchor with id 999"),
    (lambda p: p.record_deltas("q", 0, "a", torch.zeros(3, 2, 4, 64), torch.zeros(3, 2, 4, 64)), "ph_k has shape"),
    (lambda p: p.record_deltas("q", 0, "a", torch.zeros(3, 2, 5, 64), torch.zeros(3, 2, 5, 64),
                               torch.zeros(3, 2, 4, 64), None), "both seg_k and seg_v"),
    (lambda p: p.anchor_deltas("q", 0, "ghost"), "no deltas for agent 'ghost'"),
    (lambda p: p.estimate("q", "a", kv(5, 0), kv(5, 0), inv_freq(32), 0, kv(5, 0), kv(5, 0)), "inv_freq"),
    (lambda p: p.estimate("q", "a", kv(5, 0), kv(5, 0), inv_freq(64), -1, kv(5, 0), kv(5, 0)),
     r"AnchorPool.estimate: position \(the placeholder's first token in the prompt\) must be >= 0, got -1"),
    (lambda p: p.estimate("q", "a", kv(5, 0), kv(5, 0), inv_freq(64), 0, kv(5, 0), kv(5, 0),
                          seg_template_k=kv(2, 1), seg_template_v=kv(2, 1), seg_position=-7,
                          seg_dst_k=kv(2, 0), seg_dst_v=kv(2, 0)),
     r"AnchorPool.estimate: seg_position \(the following segment's first token in the prompt\) must be >= 0, "
     "got -7"),
    (lambda p: p.decide("q", torch.zeros(4, 2, 5, 64)), "this pool holds"),
    (lambda p: p.add_anchor("q", torch.zeros(3, 2, 5, 64, dtype=torch.float16),
                            torch.zeros(3, 2, 5, 64, dtype=torch.float16)), "this pool holds"),
])
def test_clear_errors(call, match):
    p = pool()
    p.add_anchor("q", kv(5, 0), kv(5, 0))
    with pytest.raises(RuntimeError, match=match):
        call(p)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=-1.0), "gamma"), (dict(tau=0.0), "tau"), (dict(top_p=1.5), "top_p"),
    (dict(capacity=0), "capacity"), (dict(window=0), "window"), (dict(byte_budget=-5), "byte_budget"),
    (dict(distance="cosine"), "distance"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        kvcomm.AnchorPool(kvcomm.PoolConfig(**kwargs))
