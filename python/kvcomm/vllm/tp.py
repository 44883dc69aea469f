"""Share-or-anchor decisions that agree across tensor-parallel ranks.

Under tensor parallelism every rank holds only its KV heads, so each rank's anchor pool
holds only those heads of every anchor, and a distance computed on one rank covers only
part of the values. Deciding on partial distances could make one rank share a content
while another makes it an anchor: the ranks would then run different paths for one
request. So with more than one rank the decision (docs/method.md §4) is taken from
distances reduced over all ranks:

    d_u^2 = sum over ranks of that rank's squared distance to anchor u

(the Frobenius norm over all heads; for the scale-free "rms" distance the squared sums
and the element counts are reduced and divided after). Every rank then feeds the same
distances to the same softmax / entropy gate (kvcomm.ops.match_decide) and takes the
same decision. Candidate lists agree because every rank's pool receives the same
anchors in the same order (the same decisions, the same requests).

One thing the pool cannot do from outside: credit activations from a decision it did
not compute (AnchorPool.decide credits the top-p anchors itself). With more than one
rank, decisions therefore credit nothing, on every rank alike, so pools stay identical;
eviction then falls back to insertion order among the oldest anchors. One rank uses
AnchorPool.decide unchanged, credits included.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops


@dataclass
class ReducedDecision:
    """The fields of kvcomm.Decision that callers read (decision_numbers, reasons)."""
    share: bool
    reason: str
    candidates: list = field(default_factory=list)
    distances: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    entropy: float = 0.0
    threshold: float = 0.0
    credited: list = field(default_factory=list)


class RankGroup:
    """The tensor-parallel group as the decision needs it: its size and a sum all-reduce."""

    def __init__(self, world_size: int = 1, all_reduce=None):
        self.world_size = int(world_size)
        self._all_reduce = all_reduce

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        return self._all_reduce(t)

    @classmethod
    def from_vllm(cls) -> "RankGroup":
        """vLLM's tensor-parallel group of this worker (one rank outside a distributed run)."""
        try:
            from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
            world = get_tensor_model_parallel_world_size()
        except Exception:  # not initialised: a single process
            return cls(1)
        if world == 1:
            return cls(1)
        group = get_tp_group()
        return cls(world, group.all_reduce)


def reduced_decide(pool, slot: str, content_v: torch.Tensor, group: RankGroup, *, force: bool = False):
    """The share-or-anchor decision for `content_v` (this rank's heads [L,H,n,D]) from
    distances reduced over `group`. One rank without `force`: AnchorPool.decide itself."""
    if group.world_size == 1 and not force:
        return pool.decide(slot, content_v)
    n = content_v.shape[2]
    cands = [a for a in pool.anchors(slot) if a.length >= n]
    cfg = pool.config
    if not cands:  # the same on every rank (identical pools), so no rank waits in a collective
        return ReducedDecision(share=False, reason="too_few_candidates")
    bases = [pool.anchor_base(slot, a.id)[1] for a in cands]
    # Squared Frobenius distances on this rank's heads, and the element count they cover.
    sq = ops.value_distances(content_v, bases, False).double() ** 2
    count = torch.tensor([float(content_v.numel())], dtype=torch.float64, device=sq.device)
    total = group.all_reduce(torch.cat([sq, count]))
    sq, count = total[:-1], total[-1]
    if cfg.distance == "rms":
        sq = sq / count
    dist = sq.sqrt().float()
    probs, entropy, share, credit = ops.match_decide(dist, cfg.tau, cfg.gamma, cfg.top_p)
    k = len(cands)
    share = bool(share)
    return ReducedDecision(
        share=share,
        reason="share" if share else ("too_few_candidates" if k < 2 else "entropy_above_gate"),
        candidates=[a.id for a in cands], distances=dist.tolist(), probs=probs.tolist(),
        entropy=float(entropy), threshold=float(cfg.gamma * torch.log2(torch.tensor(float(k)))) if k >= 2 else 0.0)
