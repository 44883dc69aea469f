"""A content longer than its slot's pool covers shares its covered head (PlanSettings.head_share):
the decision, the plan's positions, what assemble writes, and when the content becomes an
anchor after all. Synthetic KV, no model (the layout of test_planner)."""
import pytest
import torch

from kvcomm import AnchorPool, PoolConfig
from kvcomm.plan import PlanSettings, Planner
from kvcomm.plan.decide import HeadShare, covered_length, decide_content

from test_planner import ROPE, SEGMENTS, SPANS, T, agent, content, layout, session_with_bases

AGENT = "b@x"
Q_START, Q_END = SPANS[0][1], SPANS[0][2]   # {user_question}: 5 tokens


def pool_covering(head: int, anchors: int = 2, min_anchors: int = 2) -> AnchorPool:
    """{user_question} anchors `head` tokens long (the content's first tokens, then farther
    ones) with this agent's deltas; {agent_a_current} fully covered."""
    pool = AnchorPool(PoolConfig(min_anchors=min_anchors))
    k, v = content("user_question", 0)
    g = torch.Generator().manual_seed(7)
    for j in range(anchors):
        aid = pool.add_anchor("user_question", k[:, :, :head] + 3 * j, v[:, :, :head] + 3 * j)
        pool.record_deltas("user_question", aid, AGENT, torch.randn(2, 2, head, 8, generator=g),
                           torch.randn(2, 2, head, 8, generator=g))
    k, v = content("agent_a_current", 0)
    seg = SEGMENTS[1][1] - SEGMENTS[1][0]
    for j in range(2):
        aid = pool.add_anchor("agent_a_current", k + 3 * j, v + 3 * j)
        pool.record_deltas("agent_a_current", aid, AGENT, torch.randn(2, 2, 4, 8, generator=g),
                           torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, seg, 8, generator=g),
                           torch.randn(2, 2, seg, 8, generator=g))
    return pool


@pytest.fixture
def head_taken(monkeypatch):
    """The content of the test layout shares its head (which contents do is a hash of their
    tokens, tested on its own below)."""
    monkeypatch.setattr(HeadShare, "take", lambda self, slot, ids, covered=None: True)


def plan_with(pool, **settings):
    planner = Planner(pool, ROPE, PlanSettings(**settings))
    st = session_with_bases()
    return planner, planner.plan(agent(), layout(), st, max_new_tokens=4), st


def test_covered_length_is_the_min_anchors_th_longest_anchor():
    pool = AnchorPool(PoolConfig(min_anchors=3))
    assert covered_length(pool, "s") == 0
    for n in (9, 4, 7):
        pool.add_anchor("s", torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8))
    assert covered_length(pool, "s") == 4
    pool.add_anchor("s", torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8))
    assert covered_length(pool, "s") == 7


def test_a_content_longer_than_its_anchors_shares_its_covered_head(head_taken):
    pool = pool_covering(head=4)
    k, v = content("user_question", 0)
    c = decide_content(pool, "user_question", tuple(range(5)), k, v, "header", head=HeadShare(0.5))
    assert c.share and c.head == 4 and c.shared_length == 4 and c.anchor_id is None
    assert c.gate["tokens"] == 4 and c.gate["candidates"] == 2
    assert len(pool.anchors("user_question")) == 2   # not an anchor


@pytest.mark.parametrize("head_share, head", [(0.0, 4), (0.9, 4), (0.5, 2)])
def test_off_or_too_small_a_head_keeps_the_published_rule(head_share, head, head_taken):
    pool = pool_covering(head=head)
    k, v = content("user_question", 0)
    c = decide_content(pool, "user_question", tuple(range(5)), k, v, "header",
                       head=HeadShare(head_share) if head_share else None)
    assert not c.share and c.head is None and c.reason == "too_few_candidates"
    assert c.anchor_id is not None and len(pool.anchors("user_question")) == 3


def test_a_head_far_from_every_anchor_makes_the_content_an_anchor(head_taken):
    pool = pool_covering(head=4)
    k, v = content("user_question", 0)
    # midway between the two anchors (0 and +3): equally close to both, so the entropy gate fires
    c = decide_content(pool, "user_question", tuple(range(5)), k + 1.5, v + 1.5, "header", head=HeadShare(0.5))
    assert not c.share and c.head is None and c.anchor_id is not None


def test_the_plan_computes_the_tail_and_the_segment_and_estimates_the_rest(head_taken):
    _, plan, _ = plan_with(pool_covering(head=4))
    assert plan.path == "partial" and plan.computed == {0} and plan.heads == {0: 4}
    assert plan.slots[0].estimated and plan.slots[0].head == 4
    # the content's 5th token, the segment after it, the last prompt token
    assert plan.positions == [Q_START + 4] + list(range(*SEGMENTS[0])) + [T - 1]
    assert plan.decisions["user_question"] == "share first 4 of 5 tokens"
    assert plan.decisions["agent_a_current"] == "share"
    assert "tokens 4-5 computed" in plan.reason


def test_prefix_only_backends_load_up_to_the_head_and_compute_after_it(head_taken):
    _, plan, _ = plan_with(pool_covering(head=4), prefix_only=True)
    assert plan.path == "partial" and plan.prefix == Q_START + 4
    assert plan.positions == list(range(Q_START + 4, T))
    assert "after a computed slot" in plan.decisions["agent_a_current"]


def test_assemble_writes_the_head_estimate_and_leaves_the_tail(head_taken):
    pool = pool_covering(head=4)
    planner, plan, st = plan_with(pool)
    k = torch.full((2, 2, T - 1, 8), float("nan"))
    v = torch.full_like(k, float("nan"))
    planner.assemble(plan, k, v)
    assert plan.path == "partial" and plan.decisions["user_question"].startswith("share first 4 of 5 tokens")
    c = plan.contents[0]
    want_k, want_v = torch.empty(2, 2, 4, 8), torch.empty(2, 2, 4, 8)
    used = pool.estimate("user_question", AGENT, c.base_k[:, :, :4].contiguous(), c.base_v[:, :, :4].contiguous(),
                         ROPE.inv_freq, Q_START, want_k, want_v)
    assert list(used.anchors) == plan.anchors["user_question"]
    torch.testing.assert_close(k[:, :, Q_START:Q_START + 4], want_k)
    torch.testing.assert_close(v[:, :, Q_START:Q_START + 4], want_v)
    assert torch.isnan(k[:, :, Q_START + 4:SEGMENTS[0][1]]).all()   # computed by the model
    assert not torch.isnan(k[:, :, SPANS[1][1]:SPANS[1][2]]).any()   # the next slot is estimated


def test_a_partial_call_does_not_make_the_head_content_an_anchor(head_taken):
    pool = pool_covering(head=4)
    planner, plan, _ = plan_with(pool)
    planner.assemble(plan, torch.zeros(2, 2, T - 1, 8), torch.zeros(2, 2, T - 1, 8))
    assert planner.record(plan, torch.randn(2, 2, T - 1, 8), torch.randn(2, 2, T - 1, 8)) == 0
    assert len(pool.anchors("user_question")) == 2


def test_a_call_that_computes_the_whole_content_anyway_makes_it_an_anchor(head_taken):
    # Partial calls off: the head slot makes the call dense, which computes the content whole,
    # so it becomes an anchor with this agent's deltas over all its tokens at no extra cost.
    pool = pool_covering(head=4)
    planner, plan, st = plan_with(pool, partial=False)
    assert plan.path == "dense"
    assert planner.record(plan, torch.randn(2, 2, T - 1, 8), torch.randn(2, 2, T - 1, 8)) >= 1
    c = plan.contents[0]
    assert c.anchor_id is not None and "(new anchor)" in plan.decisions["user_question"]
    lengths = {a.id: (a.length, a.agents) for a in pool.anchors("user_question")}
    assert lengths[c.anchor_id] == (5, [AGENT])


def test_head_share_is_checked():
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="head_share"):
            PlanSettings(head_share=bad)


def test_one_in_two_such_contents_becomes_an_anchor_by_a_hash_of_its_tokens():
    # Head-shared contents are not anchors: without some becoming anchors the pool would
    # never learn the longer contents and their calls would stay partial for good.
    head = HeadShare(0.5)
    k, v = content("user_question", 0)
    got = []
    for i in range(40):
        pool = pool_covering(head=4)
        c = decide_content(pool, "user_question", tuple(range(10 * i, 10 * i + 5)), k, v, "header", head=head)
        assert (c.head == 4 and c.anchor_id is None) or (c.head is None and c.anchor_id is not None)
        got.append(c.head is not None)
    assert 10 <= sum(got) <= 30            # about half
    again = [head.take("user_question", tuple(range(10 * i, 10 * i + 5))) for i in range(40)]
    assert again == got                    # the same content, the same choice: no state
    # without learning the same choice, and nothing is added
    for i in range(40):
        pool = pool_covering(head=4)
        c = decide_content(pool, "user_question", tuple(range(10 * i, 10 * i + 5)), k, v, "header", learn=False,
                           head=head)
        assert (c.head is not None) == got[i] and c.anchor_id is None and len(pool.anchors("user_question")) == 2


def test_a_short_uncovered_tail_always_shares_its_head():
    # 9 of 10 tokens covered: the tail (10%) is short, so no content of this kind becomes an
    # anchor; with 8 of 10 covered the hash decides again (about one in two)
    head = HeadShare(0.5)
    contents = [tuple(range(10 * i, 10 * i + 10)) for i in range(40)]
    assert all(head.take("user_question", ids, 9) for ids in contents)
    assert 10 <= sum(head.take("user_question", ids, 8) for ids in contents) <= 30
    assert not all(HeadShare(0.5, short_tail=0.0).take("user_question", ids, 9) for ids in contents)
    with pytest.raises(ValueError, match="short_tail"):
        HeadShare(0.5, short_tail=1.0)


def test_a_head_content_computed_whole_after_a_computed_slot_becomes_an_anchor(head_taken):
    # prefix-only: {user_question} has no anchors (computed), so {agent_a_current} after it is
    # computed whole although its head (3 of 4 tokens) is covered: it is learned for free.
    pool = AnchorPool(PoolConfig(min_anchors=2))
    k, v = content("agent_a_current", 0)
    for j in range(2):
        aid = pool.add_anchor("agent_a_current", k[:, :, :3] + 3 * j, v[:, :, :3] + 3 * j)
        pool.record_deltas("agent_a_current", aid, AGENT, torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    planner, plan, _ = plan_with(pool, prefix_only=True)
    assert plan.contents[1].head == 3 and plan.slots[1].computed_from == SPANS[1][1]
    assert "after a computed slot" in plan.decisions["agent_a_current"]
    planner.record(plan, torch.randn(2, 2, T - 1, 8), torch.randn(2, 2, T - 1, 8))
    c = plan.contents[1]
    assert c.anchor_id is not None
    assert {a.id: a.length for a in pool.anchors("agent_a_current")}[c.anchor_id] == 4

