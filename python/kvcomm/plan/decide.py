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

import zlib

import torch

from .state import Content, Prepared, decision_numbers


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


def candidate_ids(pool, slot: str, tokens: int) -> tuple:
    """The ids of `slot`'s candidates for a content of `tokens` tokens (anchors at least that
    long), in pool order: the anchors AnchorPool.candidate_distances measures."""
    return tuple(a.id for a in pool.anchors(slot) if a.length >= tokens)


def decide(pool, slot: str, content_v: torch.Tensor, group: RankGroup | None = None, *, credit: bool = True,
           force_reduce: bool = False, known=None):
    """The pool's decision (a kvcomm.Decision) for content values `content_v` [L,H,n,D] (this
    rank's heads) in `slot`. One rank: AnchorPool.decide itself; several (or force_reduce,
    for tests): distances reduced over `group`, then the pool's rule.

    known: (candidate ids, distances) measured earlier for these values on one rank
    (kvcomm.plan.state.Prepared); the pool's rule takes them when the slot's candidates are
    still those anchors (anchors never change, so the distances are the same), else the
    distances are measured again."""
    if (group is None or group.world_size == 1) and not force_reduce:
        if known is not None and tuple(known[0]) == candidate_ids(pool, slot, content_v.shape[2]):
            return pool.decide_from_distances(slot, list(known[0]), known[1], credit=credit)
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


def nearest_first(ids, distances) -> tuple:
    """Candidate anchor ids, nearest first by their distances (ties in pool order)."""
    order = sorted(range(len(ids)), key=lambda u: float(distances[u]))
    return tuple(int(ids[u]) for u in order)


def usable_anchors(anchors, tokens: int, agent_key: str | None, nearest, limit: int) -> tuple:
    """The anchor ids an estimate of `tokens` tokens for agent `agent_key` uses, as
    AnchorPool.estimate chooses them: anchors (AnchorPool.anchors infos) at least that long
    holding the agent's deltas (any anchor for None), the `limit` first in `nearest` order
    (0: all; ids not in it last), in pool order. A choice that differs from the pool's (the
    pool also checks the deltas' segment) only makes the estimate compute its own weights."""
    usable = [a.id for a in anchors if a.length >= tokens and (agent_key is None or agent_key in a.agents)]
    if 0 < limit < len(usable):
        rank = {int(u): r for r, u in enumerate(nearest)}
        kept = set(sorted(usable, key=lambda u: rank.get(u, len(rank)))[:limit])
        usable = [u for u in usable if u in kept]
    return tuple(usable)


def covered_length(pool, slot: str) -> int:
    """The longest content length `slot`'s pool covers: the min_anchors-th longest anchor's
    length (0 while the slot holds fewer anchors). A content at most this long has enough
    candidates for the coverage rule."""
    lengths = sorted((a.length for a in pool.anchors(slot)), reverse=True)
    need = max(2, pool.config.min_anchors)
    return lengths[need - 1] if len(lengths) >= need else 0


class HeadShare:
    """When a content longer than its slot's pool covers shares its covered head
    (decide_content). fraction: the least covered share of the content. One in
    `learn_every` such contents becomes an anchor instead, as the published rule makes all
    of them: a head-shared content is not an anchor, and a pool that never takes the longer
    contents keeps their calls partial for good (a 30-request soak kept 6-12% of its calls on
    the reuse path, against 42-100% under the published rule). Which ones is a hash of the
    slot and the content's tokens: no state, so every planner deciding the same content (the
    server's and the in-process engine's, tensor-parallel ranks) decides it alike.

    short_tail: a content whose uncovered tail is at most this fraction of it always shares
    its head. Making it an anchor costs every agent that reads it a prefill of all of it, to
    spare later contents of about its length a tail that short (a few tokens more to compute
    in a partial call); on texts of similar lengths (reports, documents from one source) the
    hash would otherwise run every other one dense for that."""

    def __init__(self, fraction: float, learn_every: int = 2, short_tail: float = 0.1):
        if not 0 < fraction <= 1:
            raise ValueError(f"HeadShare: fraction must be in (0, 1], got {fraction!r}")
        if learn_every < 1:
            raise ValueError(f"HeadShare: learn_every must be >= 1, got {learn_every!r}")
        if not 0 <= short_tail < 1:
            raise ValueError(f"HeadShare: short_tail must be in [0, 1), got {short_tail!r}")
        self.fraction = float(fraction)
        self.learn_every = int(learn_every)
        self.short_tail = float(short_tail)

    def take(self, slot: str, ids: tuple, covered: int | None = None) -> bool:
        """Whether this content (too long for the pool, its first `covered` tokens covered)
        shares its head; else it becomes an anchor (computed, without learning). The same with
        learning or without, so a call that does not learn decides as one that does."""
        if covered is not None and len(ids) - covered <= self.short_tail * len(ids):
            return True
        key = slot.encode() + b"\0" + b",".join(str(int(t)).encode() for t in ids)
        return zlib.crc32(key) % self.learn_every != 0


def head_length(pool, slot: str, ids: tuple, head: HeadShare | None) -> int | None:
    """The covered head a content with too few candidates at its full length is decided on
    (decide_content), or None: the pool covers its first m tokens, m at least head.fraction
    of it, and head.take says so."""
    if head is None:
        return None
    n, m = len(ids), covered_length(pool, slot)
    return m if 0 < m < n and m >= head.fraction * n and head.take(slot, ids, m) else None


def decide_content(pool, slot: str, ids: tuple, k: torch.Tensor, v: torch.Tensor, source: str, *,
                   learn: bool = True, group: RankGroup | None = None, head: HeadShare | None = None,
                   prepared: Prepared | None = None) -> Content:
    """The decision for content `ids` in `slot` (base k, v neutral [L,H,n,D]); the content
    becomes a new anchor when it does not share. learn=False leaves the pool as it is: no
    activation credit, no new anchor.

    head: a content with too few candidates at its full length n whose first
    m >= head.fraction * n tokens the pool covers (covered_length) is, when head.take says
    so, decided on those m tokens; when they share, the content shares its *head*
    (Content.head = m: the first m tokens are estimated, the rest computed in context) and
    does not become an anchor here (a call that computes all of it anyway makes it one:
    Planner.record). Causal attention makes the first m tokens of a content a content of
    length m, so their estimate is the method's own; only the uncovered tail is left to the
    model.

    prepared: what was computed for this content ahead (its distances, and its head's, are
    taken when their candidates are unchanged; its weights become the content's)."""
    known = None if prepared is None else (prepared.candidates, prepared.distances)
    d = decide(pool, slot, v, group, credit=learn, known=known)
    shared_head = None
    m = head_length(pool, slot, ids, head) if not d.share and d.reason == "too_few_candidates" else None
    if m is not None:
        known = prepared.head[1:] if prepared is not None and prepared.head and prepared.head[0] == m else None
        dh = decide(pool, slot, v[:, :, :m], group, credit=learn, known=known)
        if dh.share:
            d, shared_head = dh, m
    content = Content(slot=slot, ids=tuple(ids), base_k=k, base_v=v, source=source, share=bool(d.share),
                      reason=d.reason, gate=decision_numbers(d, len(ids) if shared_head is None else shared_head),
                      head=shared_head, nearest=nearest_first(d.candidates, d.distances))
    if prepared is not None:
        for w in prepared.weights:   # token_k: [anchors, tokens estimated]
            content.weights[(int(w.token_k.shape[1]), tuple(w.anchors))] = w
    if not d.share and learn:
        content.anchor_id = pool.add_anchor(slot, k, v)
    return content
