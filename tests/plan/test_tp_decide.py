"""Tensor-parallel share-or-anchor decisions (kvcomm.plan.decide): ranks holding different KV
heads reduce their distances and hand the totals to the pool's own rule, so they decide
exactly what one process holding all heads decides - min_anchors, the entropy gate, the
reasons and the activation credit included."""
import pytest
import torch

from kvcomm import AnchorPool, PoolConfig
from kvcomm.plan.decide import RankGroup, decide

L, H, D = 3, 4, 16


def pools(distance, world, min_anchors, anchors=6):
    """A pool with all heads and `world` pools with a slice of heads each, fed the same anchors."""
    torch.manual_seed(0)
    # rms distances are ~1, so they need a small temperature to be decisive at all
    tau = 1.0 if distance == "frobenius" else 0.01
    cfg = dict(distance=distance, tau=tau, min_anchors=min_anchors)
    full = AnchorPool(PoolConfig(**cfg))
    ranks = [AnchorPool(PoolConfig(**cfg)) for _ in range(world)]
    per = H // world
    centers = [torch.randn(L, H, 12, D) for _ in range(anchors)]
    for i in range(anchors):
        n = 10 + i % 3
        k = torch.randn(L, H, n, D)
        v = centers[i][:, :, :n] + 0.05 * torch.randn(L, H, n, D)
        full.add_anchor("user_question", k, v)
        for r, p in enumerate(ranks):
            p.add_anchor("user_question", k[:, r * per:(r + 1) * per].contiguous(),
                         v[:, r * per:(r + 1) * per].contiguous())
    return full, ranks, centers


def decide_on_ranks(ranks, v, slot="user_question", credit=False):
    """Every rank's decision, with the all-reduce simulated: pass 1 records each rank's
    partial sums (without credit), pass 2 answers every rank's all-reduce with their total."""
    world, per = len(ranks), H // len(ranks)
    parts = []
    for r, p in enumerate(ranks):
        grp = RankGroup(world, lambda t: (parts.append(t.clone()), t)[1])
        decide(p, slot, v[:, r * per:(r + 1) * per].contiguous(), grp, credit=False)
    total = sum(parts) if parts else None
    out = []
    for r, p in enumerate(ranks):
        grp = RankGroup(world, lambda t: total.clone())
        out.append(decide(p, slot, v[:, r * per:(r + 1) * per].contiguous(), grp, credit=credit))
    return out


@pytest.mark.parametrize("distance", ["frobenius", "rms"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("min_anchors", [2, 4])
def test_ranks_decide_like_one_process(distance, world, min_anchors):
    full, ranks, centers = pools(distance, world, min_anchors)
    cases = [centers[1][:, :, :9] + 0.05 * torch.randn(L, H, 9, D),   # near one anchor: share
             torch.randn(L, H, 9, D) * 3,                               # far from all
             torch.randn(L, H, 30, D),                                  # longer than every anchor
             centers[0][:, :, :11] + 0.05 * torch.randn(L, H, 11, D)]   # only 4 anchors are long enough
    for v in cases:
        ref = full.decide("user_question", v, credit=False)
        for d in decide_on_ranks(ranks, v):
            assert d.share == ref.share and d.reason == ref.reason
            assert list(d.candidates) == list(ref.candidates)
            torch.testing.assert_close(torch.tensor(list(d.distances)), torch.tensor(list(ref.distances)),
                                       rtol=1e-4, atol=1e-4)
            assert d.entropy == pytest.approx(ref.entropy, abs=1e-4)
            assert d.threshold == pytest.approx(ref.threshold)
    assert any(d.share for d in decide_on_ranks(ranks, cases[0]))


def test_min_anchors_is_respected_on_ranks():
    # 3 anchors that are long enough: shared under min_anchors 2, never under 4.
    for min_anchors, shares in ((2, True), (4, False)):
        full, ranks, centers = pools("frobenius", 2, min_anchors, anchors=3)
        v = centers[1][:, :, :9] + 0.01 * torch.randn(L, H, 9, D)
        got = decide_on_ranks(ranks, v)
        assert full.decide("user_question", v, credit=False).share is shares
        assert all(d.share is shares for d in got), [(d.share, d.reason) for d in got]
        if not shares:
            assert {d.reason for d in got} == {"too_few_candidates"}


def test_ranks_credit_the_same_anchors_as_one_process():
    full, ranks, centers = pools("frobenius", 2, 2)
    v = centers[2][:, :, :9] + 0.05 * torch.randn(L, H, 9, D)
    ref = full.decide("user_question", v, credit=True)
    got = decide_on_ranks(ranks, v, credit=True)
    assert ref.share and ref.credited
    for r, d in zip(ranks, got):
        assert list(d.credited) == list(ref.credited)
        assert [a.activations for a in r.anchors("user_question")] == \
            [a.activations for a in full.anchors("user_question")]


def test_one_rank_uses_the_pool_itself():
    full, _, centers = pools("frobenius", 2, 2)
    v = centers[0][:, :, :9].clone()
    d = decide(full, "user_question", v, RankGroup(1), credit=False)
    forced = decide(full, "user_question", v, RankGroup(1), credit=False, force_reduce=True)
    assert d.share and forced.share == d.share and list(forced.candidates) == list(d.candidates)
    torch.testing.assert_close(torch.tensor(list(forced.distances)), torch.tensor(list(d.distances)))


def test_decide_from_distances_checks_its_arguments():
    full, _, _ = pools("frobenius", 2, 2)
    ids, dist = full.candidate_distances("user_question", torch.randn(L, H, 9, D))
    assert len(ids) == dist.numel() == 6
    with pytest.raises(RuntimeError, match="one entry per candidate"):
        full.decide_from_distances("user_question", ids[:-1], dist)
    with pytest.raises(RuntimeError, match="float32"):
        full.decide_from_distances("user_question", ids, dist.double())
    with pytest.raises(ValueError, match="all_reduce"):
        RankGroup(2)
