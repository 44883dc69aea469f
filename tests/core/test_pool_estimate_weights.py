"""AnchorPool.estimate(weights=...): an estimate's anchor weights depend on the content and
the anchors' bases only, so the next agent's estimate of the same content takes them
instead of reading every anchor base again - and writes exactly what computing them writes."""
from __future__ import annotations

import torch

import kvcomm
from rope_freqs import inv_freq

L, H, D = 3, 2, 64


def kv(tokens, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, tokens, D, generator=g) * scale


def pool_with(seeds=(1, 2, 3), agents=("a", "b")) -> kvcomm.AnchorPool:
    p = kvcomm.AnchorPool(kvcomm.PoolConfig(tau=0.8))
    for s in seeds:
        add(p, s, agents)
    return p


def add(p, seed, agents=("a", "b")):
    base = kv(7, seed)
    aid = p.add_anchor("q", base, base * 0.5)
    for j, agent in enumerate(agents):
        p.record_deltas("q", aid, agent, kv(7, seed + 100 + j, 0.1), kv(7, seed + 200 + j, 0.1),
                        kv(5, seed + 300 + j, 0.1), kv(5, seed + 400 + j, 0.1))
    return aid


def estimate(p, agent, content=9, tokens=6, segment=True, **kw):
    """(result, written K, written V) of one estimate of content `content` into fresh buffers."""
    k, v = torch.zeros(L, H, 40, D), torch.zeros(L, H, 40, D)
    seg = dict(seg_template_k=kv(5, 11), seg_template_v=kv(5, 12), seg_position=20 + tokens,
               seg_dst_k=k[:, :, 20 + tokens:25 + tokens], seg_dst_v=v[:, :, 20 + tokens:25 + tokens]) \
        if segment else {}
    res = p.estimate("q", agent, kv(tokens, content), kv(tokens, content + 1), inv_freq(D), 20,
                     k[:, :, 20:20 + tokens], v[:, :, 20:20 + tokens], **seg, **kw)
    return res, k, v


def test_the_next_agent_writes_the_same_with_the_first_agents_weights():
    p = pool_with()
    first, _, _ = estimate(p, "a")
    w = first.weights
    assert list(w.anchors) == list(first.anchors) and tuple(w.token_k.shape) == (3, 6)
    assert tuple(w.segment_k.shape) == (3, L, H, D)
    fresh, k, v = estimate(p, "b")
    taken, k2, v2 = estimate(p, "b", weights=w)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    assert torch.equal(taken.weights.token_k, w.token_k)


def test_weights_that_fit_are_taken():
    # another content's weights fit (same anchors, same length) and are used as given: the
    # caller passes a content's own weights only (kvcomm.plan keeps them per content)
    p = pool_with()
    other, _, _ = estimate(p, "a", content=30)
    _, k, _ = estimate(p, "b")
    _, k2, _ = estimate(p, "b", weights=other.weights)
    assert not torch.equal(k, k2)


def test_weights_that_do_not_fit_are_computed_anew():
    p = pool_with()
    head, _, _ = estimate(p, "a", tokens=5)                 # weights of 5 tokens
    _, k, v = estimate(p, "b")
    res, k2, v2 = estimate(p, "b", weights=head.weights)   # a 6-token estimate
    assert torch.equal(k, k2) and torch.equal(v, v2) and tuple(res.weights.token_k.shape) == (3, 6)
    before, _, _ = estimate(p, "a")
    add(p, 4)                                              # another anchor: another set
    _, k, v = estimate(p, "b")
    res, k2, v2 = estimate(p, "b", weights=before.weights)
    assert torch.equal(k, k2) and torch.equal(v, v2) and len(res.weights.anchors) == 4


def test_weights_of_an_estimate_without_a_segment_serve_one_with_a_segment():
    p = pool_with()
    bare, _, _ = estimate(p, "a", segment=False)
    assert bare.weights.segment_k is not None
    _, k, v = estimate(p, "b")
    _, k2, v2 = estimate(p, "b", weights=bare.weights)
    assert torch.equal(k, k2) and torch.equal(v, v2)


def test_weights_prepared_ahead_are_the_estimates_own():
    # AnchorPool.estimate_weights: what the first estimate computes, before any agent asks
    p = pool_with((1, 2, 3, 4))
    ahead = p.estimate_weights("q", kv(6, 9), kv(6, 10), nearest=[3, 1, 0, 2], limit=3)
    first, k, v = estimate(p, "a", nearest=[3, 1, 0, 2], limit=3)
    assert list(ahead.anchors) == list(first.anchors) == [0, 1, 3]
    for name in ("token_k", "token_v", "segment_k", "segment_v"):
        assert torch.equal(getattr(ahead, name), getattr(first.weights, name)), name
    _, k2, v2 = estimate(p, "a", nearest=[3, 1, 0, 2], limit=3, weights=ahead)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    assert p.estimate_weights("q", kv(9, 9), kv(9, 10)) is None          # no anchor that long
    assert p.estimate_weights("other", kv(6, 9), kv(6, 10)) is None


def test_weights_prepared_over_anchors_an_agent_lacks_are_not_taken():
    p = pool_with((1, 2))
    add(p, 3, agents=("a",))                                             # "b" has no deltas here
    ahead = p.estimate_weights("q", kv(6, 9), kv(6, 10))
    assert len(ahead.anchors) == 3
    _, k, v = estimate(p, "b")
    res, k2, v2 = estimate(p, "b", weights=ahead)
    assert torch.equal(k, k2) and torch.equal(v, v2) and len(res.anchors) == 2
