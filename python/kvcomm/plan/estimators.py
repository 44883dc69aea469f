"""How an estimated slot's KV is made: the planner's estimator extension point.

The planner decides which slots are estimated and which prompt tokens the model runs
(kvcomm.plan.recompute); an *estimator* writes the estimated slots' KV (the slot's
tokens and the agent's segment after it) into the backend's buffers. Each is named, so a
backend, the command line and the results files say which one ran:

- `anchors` (the default): KVCOMM's estimate, docs/method.md, "Estimating the offset": the content's base
  moved to its position plus the anchors' recorded deltas for this agent, weighted by
  distance (AnchorPool.estimate, C++/CUDA). Needs the pool: contents are decided, new
  anchors record deltas.
- `base`: the content's base moved exactly to its position and the agent's template
  segment moved to its position, with no offsets - what CacheBlend and EPIC start from
  (every chunk's KV computed apart, placed without correction). No decisions, no anchors:
  a slot is estimated whenever its content has a base.
- `anchors-or-base`: `anchors` where the pool can estimate a slot; where it cannot (a new
  anchor, or no anchor long enough with this agent's deltas) the slot is computed while the
  slot's pool holds fewer than min_anchors anchors with this agent's deltas (it learns, as
  `anchors` does), and gets its moved base (as `base`) once it holds them, instead of being
  computed in context. The pool then stops learning for that agent and slot: a measurement
  of what partial calls cost and buy once a pool is warm.
- `none`: nothing after the agent's exact prefix is reused: every call prefills after S0,
  which is what plain prefix caching gives (the baseline a server without KVCOMM runs).
  Contents are not encoded, replies not captured.
- `fit` / `fit-aligned`: like `anchors`, but the anchor weights are fitted per layer so
  that the weighted anchor bases reconstruct the new content's base (least squares on the
  simplex, on per-channel moments or on aligned tokens) instead of a softmax of distances
  (kvcomm.plan.fitted).

An estimator's `write` returns the anchor ids it used, an empty list when it wrote the
slot without anchors (`base`), or None when it could not estimate the slot (the planner
then computes it).
"""
from __future__ import annotations

from .. import ops
from .decide import usable_anchors


class Estimator:
    name = ""
    reuses = True         # estimates anything at all (else: prefix caching only)
    uses_anchors = True   # contents are decided against the pool, computed slots record deltas
    falls_back = False    # a slot the anchors cannot estimate gets its moved base (not computed)
    estimates_heads = False   # can estimate the first tokens of a slot only (SlotPlan.head)

    def write(self, planner, plan, i: int, k, v, *, want_spread: bool = False):
        raise NotImplementedError


class AnchorEstimator(Estimator):
    name = "anchors"
    estimates_heads = True

    def write(self, planner, plan, i, k, v, *, want_spread=False):
        slot, c, agent = plan.slots[i], plan.contents[i], plan.agent
        (a, b), (sa, sb) = slot.span, slot.segment
        base_k, base_v, seg = c.base_k, c.base_v, {}
        if slot.head is not None:   # the first tokens only: a content of that length; the segment is computed
            b = a + slot.head
            base_k, base_v = base_k[:, :, :slot.head], base_v[:, :, :slot.head]   # views: the pool takes strides
        elif sb > sa:
            seg = dict(seg_template_k=agent.seg_k[i], seg_template_v=agent.seg_v[i], seg_position=sa,
                       seg_dst_k=k[:, :, sa:sb], seg_dst_v=v[:, :, sa:sb])
        limit = planner.settings.estimate_anchors
        given = None
        if c.weights:   # weights an earlier estimate (or the server, ahead) computed over these anchors
            used = usable_anchors(planner.pool.anchors(c.slot), b - a, agent.key, c.nearest, limit)
            given = c.weights.get((b - a, used))
        res = planner.pool.estimate(c.slot, agent.key, base_k, base_v, planner.rope.inv_freq, a,
                                    k[:, :, a:b], v[:, :, a:b], **seg, want_spread=want_spread,
                                    nearest=list(c.nearest), limit=limit, weights=given)   # taken only if they fit
        if not res.anchors:
            return None
        c.weights[(b - a, tuple(res.anchors))] = res.weights
        slot.spread = res.spread
        return list(res.anchors)


def write_moved(dst_k, dst_v, src_k, src_v, position: int, inv_freq) -> None:
    """Neutral-frame K, V written at `position`: keys rotated there (exact), values as they are."""
    dst_k.copy_(ops.rope_move(src_k, inv_freq, int(position)) if position else src_k)
    dst_v.copy_(src_v)


class BaseEstimator(Estimator):
    name = "base"
    uses_anchors = False

    def write(self, planner, plan, i, k, v, *, want_spread=False):
        slot, c, agent = plan.slots[i], plan.contents[i], plan.agent
        (a, b), (sa, sb) = slot.span, slot.segment
        inv = planner.rope.inv_freq
        write_moved(k[:, :, a:b], v[:, :, a:b], c.base_k, c.base_v, a, inv)
        if sb > sa:
            write_moved(k[:, :, sa:sb], v[:, :, sa:sb], agent.seg_k[i], agent.seg_v[i], sa, inv)
        return []


class AnchorsOrBaseEstimator(AnchorEstimator):
    name = "anchors-or-base"
    falls_back = True

    def write(self, planner, plan, i, k, v, *, want_spread=False):
        used = super().write(planner, plan, i, k, v, want_spread=want_spread)
        return BaseEstimator.write(self, planner, plan, i, k, v) if used is None else used


class PrefixOnlyEstimator(Estimator):
    name = "none"
    reuses = False
    uses_anchors = False

    def write(self, planner, plan, i, k, v, *, want_spread=False):
        return None
