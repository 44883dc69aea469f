"""AnchorPool coverage (PoolConfig.min_anchors) and the per-token spread an estimate can
return."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import kvcomm
from kvcomm import ops, reference as ref

L, H, D = 3, 2, 64


def kv(tokens, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, tokens, D, generator=g) * scale


def inv_freq():
    return 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def test_default_is_the_published_two():
    assert kvcomm.PoolConfig().min_anchors == 2


@pytest.mark.parametrize("m", [2, 3, 5])
def test_a_slot_collects_min_anchors_before_it_shares(m):
    p = kvcomm.AnchorPool(kvcomm.PoolConfig(min_anchors=m, gamma=1.0))
    close = kv(8, 100)
    for i in range(m):
        d = p.decide("q", close + 1e-3 * i)
        assert not d.share and d.reason == "too_few_candidates" and len(d.candidates) == i
        p.add_anchor("q", close + 1e-3 * i, close + 1e-3 * i)
    d = p.decide("q", close)
    assert d.share and d.reason == "share" and len(d.candidates) == m


def test_only_long_enough_anchors_count_toward_coverage():
    p = kvcomm.AnchorPool(kvcomm.PoolConfig(min_anchors=3, gamma=1.0))
    for i, n in enumerate((8, 8, 3)):
        p.add_anchor("q", kv(n, i), kv(n, i))
    d = p.decide("q", kv(6, 0))
    assert d.reason == "too_few_candidates" and len(d.candidates) == 2


@pytest.mark.parametrize("m", [1, 0, -3])
def test_min_anchors_below_two_is_refused(m):
    with pytest.raises(RuntimeError, match="min_anchors must be >= 2"):
        kvcomm.AnchorPool(kvcomm.PoolConfig(min_anchors=m))


def test_estimate_returns_the_spread_of_its_anchors_when_asked():
    p = kvcomm.AnchorPool(kvcomm.PoolConfig())
    n, anchors = 6, []
    for i in range(3):
        bk, bv = kv(8, 10 + i), kv(8, 20 + i)
        a = p.add_anchor("q", bk, bv)
        d = dict(ph_k=kv(8, 30 + i, 0.1), ph_v=kv(8, 40 + i, 0.1))
        p.record_deltas("q", a, "agent", **d)
        anchors.append(dict(base_k=bk, base_v=bv, **d))
    base_k, base_v = kv(n, 1), kv(n, 2)
    dst_k, dst_v = torch.empty_like(base_k), torch.empty_like(base_v)
    plain = p.estimate("q", "agent", base_k, base_v, inv_freq(), 4, dst_k, dst_v)
    assert plain.spread is None
    res = p.estimate("q", "agent", base_k, base_v, inv_freq(), 4, dst_k, dst_v, want_spread=True)
    wk = ref.token_weights(base_k, [a["base_k"] for a in anchors], 1.0)
    wv = ref.token_weights(base_v, [a["base_v"] for a in anchors], 1.0)
    expected = (ref.token_spread([a["ph_k"] for a in anchors], wk)
                + ref.token_spread([a["ph_v"] for a in anchors], wv))
    assert res.spread.shape == (n,) and (res.spread > 0).all()
    assert_close(res.spread, expected, atol=1e-5, rtol=1e-5)
    assert_close(ops.token_spread([a["ph_k"] for a in anchors], wk), ref.token_spread([a["ph_k"] for a in anchors], wk))
