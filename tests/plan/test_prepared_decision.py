"""A content's distances measured ahead (kvcomm.plan.state.Prepared, what the server computes
when a content's encoding lands): the first call's decision takes them while the slot's
candidates are the same anchors, and measures again when they are not. Synthetic KV."""
from types import SimpleNamespace

import torch

from kvcomm import AnchorPool, PoolConfig
from kvcomm.plan import PlanSettings, Planner
from kvcomm.plan.decide import HeadShare, candidate_ids, decide_content, head_length, nearest_first, usable_anchors
from kvcomm.plan.state import Prepared, Session

from test_planner import ROPE, SPANS, D, H, L, T, agent, content, layout, pool_with as planner_pool

SLOT = "user_question"


def kv(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)


def pool_with(anchors: int, n: int = 6) -> AnchorPool:
    pool = AnchorPool(PoolConfig(min_anchors=2, gamma=4.0))
    for j in range(anchors):
        k, v = kv(100 + j, n)
        pool.add_anchor(SLOT, k, v)
    return pool


def measured(pool, v) -> Prepared:
    cand, dist = pool.candidate_distances(SLOT, v, rms=pool.config.distance == "rms")
    return Prepared(tuple(int(i) for i in cand), dist)


def test_candidate_ids_are_the_anchors_the_distances_cover():
    pool = pool_with(3)
    pool.add_anchor(SLOT, *kv(9, 3))   # too short for a 6-token content
    k, v = kv(1)
    cand, _ = pool.candidate_distances(SLOT, v, rms=False)
    assert candidate_ids(pool, SLOT, 6) == tuple(int(i) for i in cand) and len(cand) == 3
    assert len(candidate_ids(pool, SLOT, 3)) == 4


def test_prepared_distances_decide_as_measuring_them_does():
    k, v = kv(1)
    fresh, ahead = pool_with(4), pool_with(4)
    want = decide_content(fresh, SLOT, (1, 2, 3, 4, 5, 6), k, v, "header")
    prep = measured(ahead, v)
    got = decide_content(ahead, SLOT, (1, 2, 3, 4, 5, 6), k, v, "header", prepared=prep)
    assert (got.share, got.reason, got.nearest) == (want.share, want.reason, want.nearest)
    assert got.gate == want.gate
    # the decision's activation credit is given as when it measures
    assert [a.activations for a in ahead.anchors(SLOT)] == [a.activations for a in fresh.anchors(SLOT)]


def test_prepared_distances_are_taken_while_the_candidates_are_the_same():
    k, v = kv(1)
    prep = measured(pool_with(3), v)
    given = Prepared(prep.candidates, torch.tensor([0.5, 0.25, 0.75]))
    got = decide_content(pool_with(3), SLOT, (1, 2, 3, 4, 5, 6), k, v, "header", prepared=given)
    assert got.gate["nearest"] == [0.25, 0.5]   # the given distances, not measured ones
    assert got.nearest == nearest_first(prep.candidates, given.distances)


def test_prepared_distances_are_not_taken_once_the_candidates_changed():
    k, v = kv(1)
    pool = pool_with(3)
    prep = Prepared(measured(pool, v).candidates, torch.tensor([0.5, 0.25, 0.75]))
    pool.add_anchor(SLOT, k + 0.01, v + 0.01)   # an anchor next to the content arrives after
    got = decide_content(pool, SLOT, (1, 2, 3, 4, 5, 6), k, v, "header", prepared=prep)
    assert len(got.nearest) == 4   # measured again: the new anchor is a candidate, and the nearest
    assert got.nearest[0] == candidate_ids(pool, SLOT, 6)[-1]
    assert got.gate["nearest"][0] < 0.25


def test_prepared_weights_become_the_contents_by_their_length_and_anchors():
    k, v = kv(1)
    pool = pool_with(4)
    prep = measured(pool, v)
    w1 = SimpleNamespace(anchors=[1, 2], token_k=torch.zeros(2, 6))
    w2 = SimpleNamespace(anchors=[2, 3], token_k=torch.zeros(2, 6))
    prep.weights = (w1, w2)
    got = decide_content(pool, SLOT, (1, 2, 3, 4, 5, 6), k, v, "header", prepared=prep)
    assert got.weights == {(6, (1, 2)): w1, (6, (2, 3)): w2}


def test_a_first_carriers_settle_decides_with_what_was_prepared():
    """The server prepares a content when its encoding lands, before the first carrier's
    settle: settle's decision takes the prepared distances and the content keeps the weights
    for the next agent's estimate."""
    pool = planner_pool({"user_question"}, anchors=3)
    planner = Planner(pool, ROPE, PlanSettings(defer_first_encoding=True))
    st = Session(index=1)
    plan = planner.plan(agent(), layout(), st, max_new_tokens=4, encode=lambda kind, ids: None)
    assert "user_question" in plan.first_carrier
    planner.record(plan, torch.randn(L, H, T, D), torch.randn(L, H, T, D))
    slot, a, b = SPANS[0]
    ids = tuple(layout().ids[a:b])
    st.encoded[("question", ids)] = content(slot, 0)
    cand = candidate_ids(pool, slot, b - a)
    marker = SimpleNamespace(anchors=list(cand), token_k=torch.zeros(len(cand), b - a))
    st.prepared[(slot, ids)] = Prepared(cand, torch.tensor([0.0, 9.0, 9.5]), (marker,))
    planner.settle(plan, st)
    c = st.contents[(slot, ids)]
    assert c.gate["nearest"] == [0.0, 9.0] and c.share   # decided on the prepared distances
    assert c.weights[(b - a, cand)] is marker and (slot, ids) not in st.prepared


def test_usable_anchors_are_the_ones_the_pools_estimate_reads():
    """Agents that hold deltas of different anchors estimate over different sets; the planner
    looks the prepared weights up by the set the pool will choose."""
    g = torch.Generator().manual_seed(5)
    pool = AnchorPool(PoolConfig(min_anchors=2))
    k, v = kv(1)
    for j in range(6):
        aid = pool.add_anchor(SLOT, k + j, v + j)
        for agent in (("x", "y") if j % 2 else ("x",)):
            pool.record_deltas(SLOT, aid, agent, torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g))
    pool.add_anchor(SLOT, *kv(9, 3))   # too short
    ids = [a.id for a in pool.anchors(SLOT)]
    nearest = tuple(reversed(ids[:6]))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    for agent in ("x", "y"):
        for limit in (0, 1, 2, 4):
            res = pool.estimate(SLOT, agent, k, v, inv_freq, 0, torch.empty_like(k), torch.empty_like(v),
                                nearest=list(nearest), limit=limit)
            assert usable_anchors(pool.anchors(SLOT), 6, agent, nearest, limit) == tuple(res.anchors), (agent, limit)
    assert usable_anchors(pool.anchors(SLOT), 6, "y", nearest, 2) == (ids[3], ids[5])
    assert usable_anchors(pool.anchors(SLOT), 3, None, nearest, 0) == tuple(ids)


def test_a_content_too_long_for_the_pool_is_decided_on_its_prepared_head(monkeypatch):
    monkeypatch.setattr(HeadShare, "take", lambda self, slot, ids, covered=None: True)
    pool = AnchorPool(PoolConfig(min_anchors=2, gamma=4.0))
    k, v = kv(1)
    for j in range(3):   # anchors covering the content's first 4 of 6 tokens
        pool.add_anchor(SLOT, k[:, :, :4] + j, v[:, :, :4] + j)
    ids, head = (1, 2, 3, 4, 5, 6), HeadShare(0.5)
    assert head_length(pool, SLOT, ids, head) == 4
    hc = candidate_ids(pool, SLOT, 4)
    prep = Prepared(candidate_ids(pool, SLOT, 6), torch.zeros(0), head=(4, hc, torch.tensor([0.5, 0.25, 0.75])))
    got = decide_content(pool, SLOT, ids, k, v, "header", head=head, prepared=prep)
    assert got.head == 4 and got.share and got.gate["nearest"] == [0.25, 0.5]   # the prepared head distances
    stale = Prepared(prep.candidates, prep.distances, head=(3, hc, prep.head[2]))   # another head length
    again = decide_content(pool, SLOT, ids, k, v, "header", head=head, prepared=stale)
    assert again.head == 4 and again.gate["nearest"] != [0.25, 0.5]   # measured, not taken
