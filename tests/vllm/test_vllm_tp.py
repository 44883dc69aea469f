"""Tensor-parallel share-or-anchor decisions: ranks holding different KV heads decide
from distances reduced over all ranks, and so decide exactly what one rank holding all
heads decides."""
import pytest
import torch

from kvcomm import AnchorPool, PoolConfig
from kvcomm.vllm.tp import RankGroup, reduced_decide

L, H, D = 3, 4, 16


def pools(distance, world):
    """A pool with all heads and `world` pools with a slice of heads each, fed the same anchors."""
    torch.manual_seed(0)
    # rms distances are ~1, so they need a small temperature to be decisive at all
    tau = 1.0 if distance == "frobenius" else 0.01
    full = AnchorPool(PoolConfig(distance=distance, tau=tau))
    ranks = [AnchorPool(PoolConfig(distance=distance, tau=tau)) for _ in range(world)]
    per = H // world
    centers = [torch.randn(L, H, 12, D) for _ in range(6)]
    for i in range(6):
        k = torch.randn(L, H, 10 + i % 3, D)
        v = centers[i][:, :, :10 + i % 3] + 0.05 * torch.randn(L, H, 10 + i % 3, D)
        full.add_anchor("user_question", k, v)
        for r, p in enumerate(ranks):
            p.add_anchor("user_question", k[:, r * per:(r + 1) * per].contiguous(),
                         v[:, r * per:(r + 1) * per].contiguous())
    return full, ranks, centers


def decide_on_ranks(ranks, v, slot="user_question"):
    """Every rank's decision, with the all-reduce simulated: pass 1 records each rank's
    partial sums, pass 2 answers every rank's all-reduce with their total."""
    world, per = len(ranks), H // len(ranks)
    parts = []
    for r, p in enumerate(ranks):
        grp = RankGroup(world, lambda t: (parts.append(t.clone()), t)[1])
        reduced_decide(p, slot, v[:, r * per:(r + 1) * per].contiguous(), grp)
    total = sum(parts) if parts else None
    out = []
    for r, p in enumerate(ranks):
        grp = RankGroup(world, lambda t: total.clone())
        out.append(reduced_decide(p, slot, v[:, r * per:(r + 1) * per].contiguous(), grp))
    return out


@pytest.mark.parametrize("distance", ["frobenius", "rms"])
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_decide_like_one_rank(distance, world):
    full, ranks, centers = pools(distance, world)
    cases = [centers[1][:, :, :9] + 0.05 * torch.randn(L, H, 9, D),   # near one anchor group: share
             torch.randn(L, H, 9, D) * 3,                               # far from all
             torch.randn(L, H, 30, D)]                                  # longer than every anchor
    for v in cases:
        ref = full.decide("user_question", v, credit=False)
        got = decide_on_ranks(ranks, v)
        for d in got:
            assert d.share == ref.share and d.reason == ref.reason
            assert d.candidates == list(ref.candidates)
            torch.testing.assert_close(torch.tensor(d.distances), torch.tensor(list(ref.distances)),
                                       rtol=1e-4, atol=1e-4)
            assert d.entropy == pytest.approx(ref.entropy, abs=1e-4)
    assert any(d.share for d in decide_on_ranks(ranks, cases[0]))


def test_one_rank_uses_the_pool_itself():
    full, _, centers = pools("frobenius", 2)
    v = centers[0][:, :, :9].clone()
    d = reduced_decide(full, "user_question", v, RankGroup(1))
    assert type(d).__name__ == "Decision" and d.share   # AnchorPool.decide, credit included
    forced = reduced_decide(full, "user_question", v, RankGroup(1), force=True)
    assert forced.share == d.share and forced.candidates == list(d.candidates)
