"""What a slot's estimate reads, as the planner asks for it: at most
PlanSettings.estimate_anchors of the nearest candidates, and the anchor weights an earlier
agent's estimate of the same content computed. Synthetic KV, no model."""
import pytest
import torch

from test_head_share import AGENT, plan_with, pool_covering
from test_planner import SEGMENTS, T, agent, content, layout


def pool_of_three():
    """{user_question} anchors 0, 3 and 6 away from the content, with this agent's deltas."""
    pool = pool_covering(head=5, anchors=0)
    k, v = content("user_question", 0)
    seg = SEGMENTS[0][1] - SEGMENTS[0][0]
    g = torch.Generator().manual_seed(3)
    for j in range(3):
        aid = pool.add_anchor("user_question", k + 3 * j, v + 3 * j)
        pool.record_deltas("user_question", aid, AGENT, *(torch.randn(2, 2, n, 8, generator=g)
                                                          for n in (5, 5, seg, seg)))
    return pool

@pytest.mark.parametrize("limit, used", [(1, [0]), (2, [0, 1]), (0, [0, 1, 2])])
def test_an_estimate_uses_the_nearest_anchors_up_to_the_limit(limit, used):
    # PlanSettings.estimate_anchors: anchor j sits 3j away from the content, so the nearest
    # come first; the plan reports the ones the estimate read.
    pool = pool_of_three()
    planner, plan, _ = plan_with(pool, estimate_anchors=limit)
    k = torch.zeros(2, 2, T - 1, 8)
    planner.assemble(plan, k, torch.zeros_like(k))
    ids = [a.id for a in pool.anchors("user_question")]
    assert plan.contents[0].nearest == tuple(ids)
    assert plan.anchors["user_question"] == [ids[j] for j in used]


class Recording:
    """The pool, with the weights each estimate was given and returned."""

    def __init__(self, pool):
        self._pool, self.given, self.returned = pool, [], []

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def estimate(self, *a, **kw):
        self.given.append(kw.get("weights"))
        res = self._pool.estimate(*a, **kw)
        self.returned.append(res.weights)
        return res


def test_the_next_call_on_a_content_takes_its_anchor_weights():
    pool = Recording(pool_of_three())
    planner, first, st = plan_with(pool)
    k1 = torch.zeros(2, 2, T - 1, 8)
    planner.assemble(first, k1, torch.zeros_like(k1))
    c = first.contents[0]
    used = tuple(first.anchors["user_question"])
    assert pool.given[0] is None and list(c.weights[(5, used)].anchors) == list(used)
    second = planner.plan(agent(), layout(), st, max_new_tokens=4)
    assert second.contents[0] is c                       # the session's content, decided once
    k2 = torch.zeros_like(k1)
    planner.assemble(second, k2, torch.zeros_like(k2))
    given, first_w = pool.given[2], pool.returned[0]     # slot 0 of the second call took them
    assert given is not None and list(given.anchors) == list(first_w.anchors)
    assert given.token_k.data_ptr() == first_w.token_k.data_ptr()
    assert torch.equal(k1, k2)
