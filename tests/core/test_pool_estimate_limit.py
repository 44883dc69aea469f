"""AnchorPool.estimate with a limit: at most `limit` anchors, the first of `nearest` that
are usable, summed in pool order - exactly the estimate of a pool holding only those."""
from __future__ import annotations

import pytest
import torch

import kvcomm
from rope_freqs import inv_freq

L, H, D = 3, 2, 64


def kv(tokens, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, H, tokens, D, generator=g) * scale).to(dtype)


def add(p, seed, agent="a", length=7):
    base = kv(length, seed)
    aid = p.add_anchor("q", base, base * 0.5)
    p.record_deltas("q", aid, agent, kv(length, seed + 100, 0.1), kv(length, seed + 200, 0.1),
                    kv(5, seed + 300, 0.1), kv(5, seed + 400, 0.1))
    return aid


def estimate(p, **kw):
    """(anchors used, K, V, segment K, segment V) of one estimate into fresh buffers."""
    k, v = torch.zeros(L, H, 40, D), torch.zeros(L, H, 40, D)
    res = p.estimate("q", "a", kv(6, 9), kv(6, 10), inv_freq(D), 20, k[:, :, 20:26], v[:, :, 20:26],
                     seg_template_k=kv(5, 11), seg_template_v=kv(5, 12), seg_position=26,
                     seg_dst_k=k[:, :, 26:31], seg_dst_v=v[:, :, 26:31], **kw)
    return list(res.anchors), k, v


def test_a_limit_above_the_usable_anchors_changes_nothing():
    p = kvcomm.AnchorPool(kvcomm.PoolConfig(tau=0.8))
    ids = [add(p, s) for s in (1, 2, 3)]
    used, k, v = estimate(p)
    for limit in (3, 4, 20):
        used2, k2, v2 = estimate(p, nearest=ids[::-1], limit=limit)
        assert used2 == used == ids
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_the_nearest_are_used_and_summed_in_pool_order():
    seeds = (1, 2, 3, 4, 5)
    p = kvcomm.AnchorPool(kvcomm.PoolConfig(tau=0.8))
    ids = [add(p, s) for s in seeds]
    used, k, v = estimate(p, nearest=[ids[3], ids[0], ids[4], ids[1]], limit=2)
    assert used == [ids[0], ids[3]]
    only = kvcomm.AnchorPool(kvcomm.PoolConfig(tau=0.8))   # the same two anchors, nothing else
    for s in (seeds[0], seeds[3]):
        add(only, s)
    _, k_only, v_only = estimate(only)
    assert torch.equal(k, k_only) and torch.equal(v, v_only)
    used3, k3, _ = estimate(p, nearest=[ids[4]], limit=3)   # unlisted ones follow in pool order
    assert used3 == [ids[0], ids[1], ids[4]]
    assert not torch.equal(k3, k)


def test_unusable_anchors_do_not_take_a_place():
    p = kvcomm.AnchorPool(kvcomm.PoolConfig(tau=0.8))
    short = add(p, 1, length=5)            # shorter than the content
    other = add(p, 2, agent="b")           # no deltas of agent "a"
    ids = [add(p, s) for s in (3, 4)]
    used, _, _ = estimate(p, nearest=[short, other, ids[1], ids[0]], limit=1)
    assert used == [ids[1]]


def test_a_negative_limit_is_refused():
    p = kvcomm.AnchorPool()
    add(p, 1)
    with pytest.raises(RuntimeError, match="limit"):
        estimate(p, limit=-1)


def test_the_planner_passes_the_decisions_order_and_its_setting(monkeypatch):
    from kvcomm.plan.decide import nearest_first
    from kvcomm.plan.planner import PlanSettings

    assert nearest_first([7, 3, 5], [2.0, 0.5, 1.0]) == (3, 5, 7)
    assert nearest_first([4, 9], torch.tensor([1.0, 1.0])) == (4, 9)   # ties: pool order
    assert PlanSettings().estimate_anchors == 8
    assert "estimate_anchors=0" in PlanSettings(estimate_anchors=0).describe()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="estimate_anchors"):
            PlanSettings(estimate_anchors=bad)
