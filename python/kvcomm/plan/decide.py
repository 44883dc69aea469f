"""The share-or-anchor decision of one content (docs/method.md, "Deciding"), for one process
or for tensor-parallel ranks.

Under tensor parallelism every rank holds only its KV heads, so each rank's pool holds only
those heads of every anchor, and a distance computed on one rank covers only part of the
values. Deciding on partial distances could make one rank share a content while another
makes it an anchor. So with more than one rank every rank computes its squared Frobenius
distances to the slot's candidates (AnchorPool.candidate_distances), the sums are reduced
over the ranks,

    d_u^2 = sum over ranks of that rank's squared distance to anchor u

(for the scale-free "rms" distance the element counts are reduced too and divide the sum),
and every rank hands the totals to the pool's own decision rule
(AnchorPool.decide_from_distances): the same entropy gate, the same coverage rule
(min_anchors), the same reasons and the same activation credit as one process deciding on
all heads. Candidate lists agree because every rank's pool receives the same anchors in the
same order (the same decisions, the same requests), and credit is identical on every rank.
"""
from __future__ import annotations

import torch

from .state import Content, decision_numbers


class RankGroup:
    """The tensor-parallel group as the decision needs it: its size and a sum all-reduce."""

    def __init__(self, world_size: int = 1, all_reduce=None):
        self.world_size = int(world_size)
        if self.world_size < 1:
            raise ValueError(f"RankGroup: world_size must be >= 1, got {world_size}")
        if self.world_size > 1 and all_reduce is None:
            raise ValueError("RankGroup: more than one rank needs an all_reduce")
        self._all_reduce = all_reduce

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        return self._all_reduce(t)


def decide(pool, slot: str, content_v: torch.Tensor, group: RankGroup | None = None, *, credit: bool = True,
           force_reduce: bool = False):
    """The pool's decision (a kvcomm.Decision) for content values `content_v` [L,H,n,D] (this
    rank's heads) in `slot`. One rank: AnchorPool.decide itself; several (or force_reduce,
    for tests): distances reduced over `group`, then the pool's rule."""
    if (group is None or group.world_size == 1) and not force_reduce:
        return pool.decide(slot, content_v, credit=credit)
    group = group or RankGroup(1)
    ids, dist = pool.candidate_distances(slot, content_v, rms=False)
    if ids:   # no candidates: the same on every rank (identical pools), so no rank waits in a collective
        sq = dist.double() ** 2
        count = torch.tensor([float(content_v.numel())], dtype=torch.float64, device=sq.device)
        total = group.all_reduce(torch.cat([sq, count]))
        sq, count = total[:-1], total[-1]
        if pool.config.distance == "rms":
            sq = sq / count
        dist = sq.sqrt().float()
    return pool.decide_from_distances(slot, ids, dist, credit=credit)


def decide_content(pool, slot: str, ids: tuple, k: torch.Tensor, v: torch.Tensor, source: str, *,
                   learn: bool = True, group: RankGroup | None = None) -> Content:
    """The decision for content `ids` in `slot` (base k, v neutral [L,H,n,D]); the content
    becomes a new anchor when it does not share. learn=False leaves the pool as it is: no
    activation credit, no new anchor."""
    d = decide(pool, slot, v, group, credit=learn)
    content = Content(slot=slot, ids=tuple(ids), base_k=k, base_v=v, source=source, share=bool(d.share),
                      reason=d.reason, gate=decision_numbers(d, len(ids)))
    if not d.share and learn:
        content.anchor_id = pool.add_anchor(slot, k, v)
    return content
