"""The pieces of one KVCOMM-mode call between the decisions and the model's forward.

Per slot the call either *estimates* the content's KV (and the agent's segment after it)
from the pool's anchors, or *computes* it in context (the content is a new anchor, or no
anchor holds deltas for this agent). A call whose slots are all estimated is a reuse call,
one with some estimated and some computed slots a partial call, one with none estimated a
dense call (docs/method.md section 6). Computed slots then record their deltas into their
anchors (docs/method.md section 2):

- on a dense call the recorded KV is the real (dense) KV;
- on a partial call it is the KV the model computes for the slot *given the estimated
  slots before it* (exact when every slot before it is computed too). Causal attention
  means slots after it never change it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .kv import neutral_pair
from .recompute import SlotPlan


@dataclass
class CallPlan:
    slots: list[SlotPlan]
    missing: set[int] = field(default_factory=set)   # computed because no anchor has this agent's deltas
    why: dict = field(default_factory=dict)          # slot index -> why it is computed

    @property
    def computed(self) -> set[int]:
        return {i for i, s in enumerate(self.slots) if not s.estimated}

    @property
    def any_estimated(self) -> bool:
        return any(s.estimated for s in self.slots)

    def reason(self) -> str:
        """Why slots are computed, in slot order ('' when none is)."""
        return "; ".join(f"slot {self.slots[i].name}: {self.why[i]}" for i in sorted(self.why))


def _has_deltas(pool, slot: str, agent_key: str, n: int) -> bool:
    return any(a.length >= n and agent_key in a.agents for a in pool.anchors(slot))


def plan_slots(pool, agent_key: str, lay, contents, slot_decisions: dict) -> CallPlan:
    """Which slots can be estimated for this agent; records each slot's decision text."""
    plan = CallPlan(slots=[])
    for i, c in enumerate(contents):
        name, a, b = lay.spans[i]
        estimated = False
        if not c.share:
            slot_decisions[name] = f"{c.reason} (new anchor)"
            plan.why[i] = c.reason
        elif not _has_deltas(pool, c.slot, agent_key, c.length):
            slot_decisions[name] = "share, but no anchor has deltas for this agent"
            plan.missing.add(i)
            plan.why[i] = "no deltas for agent"
        else:
            slot_decisions[name] = "share"
            estimated = True
        plan.slots.append(SlotPlan(name=name, span=(a, b), segment=tuple(lay.segments[i]), estimated=estimated))
    return plan


def assemble(pool, st, lay, contents, plan: CallPlan, cache, inv_freq, want_spread: bool,
             slot_decisions: dict, slot_anchors: dict) -> None:
    """Writes the exact S0 and every estimated slot (with its segment) into `cache`; one
    core call per slot does all layers. A slot the pool cannot estimate after all (its
    anchors were evicted since the decision) becomes a computed one."""
    s0 = st.s0
    cache.k[:, :, :s0].copy_(st.s0_k)
    cache.v[:, :, :s0].copy_(st.s0_v)
    for i, c in enumerate(contents):
        slot = plan.slots[i]
        if not slot.estimated:
            continue
        a, b = slot.span
        sa, sb = slot.segment
        dk, dv = cache.span(a, b)
        seg = {}
        if sb > sa:
            gk, gv = cache.span(sa, sb)
            seg = dict(seg_template_k=st.seg_k[i], seg_template_v=st.seg_v[i], seg_position=sa,
                       seg_dst_k=gk, seg_dst_v=gv)
        res = pool.estimate(c.slot, st.key, c.base_k, c.base_v, inv_freq, a, dk, dv, **seg,
                            want_spread=want_spread)
        if not res.anchors:
            slot_decisions[slot.name] = "share, but no usable anchor for this agent"
            slot.estimated = False
            plan.missing.add(i)
            plan.why[i] = "no usable anchor for agent"
            continue
        slot.spread = res.spread
        slot_anchors[slot.name] = list(res.anchors)
        slot_decisions[slot.name] = f"share (estimated from anchors {list(res.anchors)})"


def record(pool, st, lay, cache, contents, plan: CallPlan, which, inv_freq, slot_decisions: dict) -> None:
    """Slots `which` (computed in this call's cache): KV -> neutral-frame deltas, recorded
    into their anchors. A dense call passes every slot: its KV is real for all of them."""
    for i in sorted(which):
        c = contents[i]
        name, a, b = lay.spans[i]
        if c.anchor_id is None and i in plan.missing:
            # Shared content, but no anchor holds this agent's deltas: the content
            # becomes an anchor so the agent has something to record into.
            c.anchor_id = pool.add_anchor(c.slot, c.base_k, c.base_v)
            slot_decisions[name] += " (new anchor)"
        if c.anchor_id is None:
            continue
        ph_k, ph_v = neutral_pair(cache, a, b, inv_freq)
        ph_k.sub_(c.base_k)
        ph_v.sub_(c.base_v)
        seg_k = seg_v = None
        sa, sb = lay.segments[i]
        if sb > sa:
            seg_k, seg_v = neutral_pair(cache, sa, sb, inv_freq)
            seg_k.sub_(st.seg_k[i])
            seg_v.sub_(st.seg_v[i])
        try:
            pool.record_deltas(c.slot, c.anchor_id, st.key, ph_k, ph_v, seg_k, seg_v)
        except RuntimeError as e:  # the anchor was evicted since it was added
            slot_decisions[name] += f"; deltas not recorded: {str(e).splitlines()[0]}"
