"""The per-call steps of the method on explicit KV buffers, for engines that do not own the model.

The vLLM connector (kvcomm.vllm) runs these steps on KV it reads from and writes to
vLLM's paged cache, on plain [layers, kv_heads, tokens, head_dim] buffers indexed by
absolute prompt position. KVCommEngine runs the same decisions on its own transformers
cache through paths.py, which also plans partial calls and recompute (docs/method.md
section 9); the connector takes the all-or-nothing path of section 6:

- decide_content: the share-or-anchor decision for one content (docs/method.md §4);
- path_reason: whether every slot can be estimated for this agent (§6);
- assemble: exact S0 + estimated slots and segments written into a buffer (§5, §6);
- record_deltas: real KV of a dense prefill -> neutral-frame deltas into the anchors (§6).
"""
from __future__ import annotations

import torch

from .kv import neutral_keys
from .request import Content, decision_numbers


def decide_content(pool, slot: str, ids: tuple, k: torch.Tensor, v: torch.Tensor, source: str,
                   decide=None, learn: bool = True) -> Content:
    """The pool's decision for content `ids` in `slot` (base k, v neutral [L,H,n,D]); a new
    anchor is added when it does not share. `decide(slot, v)` replaces pool.decide (the
    tensor-parallel connector decides from distances reduced across ranks). learn=False
    leaves the pool as it is: no activation credit, no new anchor."""
    if learn:
        d = (decide or pool.decide)(slot, v)
    else:
        d = pool.decide(slot, v, credit=False) if decide is None else decide(slot, v)
    content = Content(slot=slot, ids=ids, base_k=k, base_v=v, source=source, share=bool(d.share),
                      reason=d.reason, gate=decision_numbers(d, len(ids)))
    if not d.share and learn:
        content.anchor_id = pool.add_anchor(slot, k, v)
    return content


def has_deltas(pool, slot: str, agent_key: str, n: int) -> bool:
    return any(a.length >= n and agent_key in a.agents for a in pool.anchors(slot))


def path_reason(pool, agent_key: str, spans, contents, slot_decisions: dict,
                missing_deltas: set) -> str | None:
    """None when every slot can be estimated; else why the call runs dense. Fills
    slot_decisions (slot -> what was decided) and missing_deltas (slot indices that
    share but have no anchor with this agent's deltas)."""
    reason = None
    for i, c in enumerate(contents):
        name = spans[i][0]
        if not c.share:
            slot_decisions[name] = f"{c.reason} (new anchor)"
            reason = reason or f"slot {name}: {c.reason}"
        elif not has_deltas(pool, c.slot, agent_key, c.length):
            slot_decisions[name] = "share, but no anchor has deltas for this agent"
            missing_deltas.add(i)
            reason = reason or f"slot {name}: no deltas for agent"
        else:
            slot_decisions[name] = "share"
    return reason


def assemble(pool, agent, lay, contents, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
             slot_decisions: dict) -> str | None:
    """Writes the agent's exact S0 and every slot's (and following segment's) estimate into
    k, v [L,H,>=T-1,D]; one pool.estimate call per slot covers all layers. None on
    success, else why not (an anchor usable for this agent was gone after all)."""
    s0 = agent.s0
    k[:, :, :s0].copy_(agent.s0_k)
    v[:, :, :s0].copy_(agent.s0_v)
    for i, c in enumerate(contents):
        name, a, b = lay.spans[i]
        sa, sb = lay.segments[i]
        seg = {}
        if sb > sa:
            seg = dict(seg_template_k=agent.seg_k[i], seg_template_v=agent.seg_v[i], seg_position=sa,
                       seg_dst_k=k[:, :, sa:sb], seg_dst_v=v[:, :, sa:sb])
        res = pool.estimate(c.slot, agent.key, c.base_k, c.base_v, inv_freq, a, k[:, :, a:b], v[:, :, a:b], **seg)
        if not res.anchors:
            slot_decisions[name] = "share, but no usable anchor for this agent"
            return f"slot {name}: no deltas for agent"
        slot_decisions[name] = f"share (estimated from anchors {list(res.anchors)})"
    return None


def record_deltas(pool, agent, lay, contents, missing_deltas: set, slot_decisions: dict,
                  k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Dense path: the real KV k, v [L,H,>=T-1,D] of the prompt (absolute positions)
    becomes neutral-frame deltas recorded into this call's anchors."""
    for i, c in enumerate(contents):
        name, a, b = lay.spans[i]
        if c.anchor_id is None and i in missing_deltas:
            # Shared content, but no anchor holds this agent's deltas: the content
            # becomes an anchor so the agent has something to record into.
            c.anchor_id = pool.add_anchor(c.slot, c.base_k, c.base_v)
            slot_decisions[name] += " (new anchor)"
        if c.anchor_id is None:
            continue
        ph_k = neutral_keys(k[:, :, a:b], a, inv_freq)
        ph_v = v[:, :, a:b].contiguous().clone()
        ph_k.sub_(c.base_k)
        ph_v.sub_(c.base_v)
        seg_k = seg_v = None
        sa, sb = lay.segments[i]
        if sb > sa:
            seg_k = neutral_keys(k[:, :, sa:sb], sa, inv_freq)
            seg_v = v[:, :, sa:sb].contiguous().clone()
            seg_k.sub_(agent.seg_k[i])
            seg_v.sub_(agent.seg_v[i])
        try:
            pool.record_deltas(c.slot, c.anchor_id, agent.key, ph_k, ph_v, seg_k, seg_v)
        except RuntimeError as e:  # the anchor was evicted since it was added
            slot_decisions[name] += f"; deltas not recorded: {str(e).splitlines()[0]}"
