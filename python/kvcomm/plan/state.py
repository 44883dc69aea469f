"""What the planner keeps between calls: agents, sessions, contents and replies.

- AgentState: one agent's template, its exact prefix S0 and the neutral-frame KV of the
  template's segments (docs/method.md, "Terms": template KV), made from the KV of one
  forward over the template rendered with the placeholder markers in place;
- Session: one multi-agent request (a conversation): the contents decided so far, header
  encodings, and the replies of this round and the previous one;
- Content: one content of one slot in one session, its base KV and its share-or-anchor
  decision, decided once by its first consumer and shared by every later one.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .neutral import neutral_span
from .template import ChatFrame, PromptLayout, Template


def decision_numbers(decision, tokens: int) -> dict:
    """What the pool's share-or-anchor decision (docs/method.md, "Deciding") saw, small enough
    for a call record: how many candidates, how close the nearest two were, the entropy
    against its threshold - why the entropy gate fired, not only that it did."""
    dist = sorted(float(x) for x in decision.distances)
    return {"tokens": int(tokens), "candidates": len(decision.candidates),
            "entropy": float(decision.entropy), "threshold": float(decision.threshold),
            "nearest": dist[:2], "top_prob": max((float(p) for p in decision.probs), default=None)}


@dataclass
class Content:
    """One content in one slot of a session: its base and its decision."""
    slot: str
    ids: tuple[int, ...]
    base_k: torch.Tensor          # neutral [L,H,n,D]
    base_v: torch.Tensor
    source: str                   # "reply" (cut from the sender's KV) or "header"
    share: bool
    reason: str                   # the pool's decision reason
    anchor_id: int | None = None  # set when this content is an anchor of its slot
    gate: dict = field(default_factory=dict)   # the decision's numbers (decision_numbers)
    head: int | None = None       # shares only its first `head` tokens (kvcomm.plan.decide.decide_content)
    nearest: tuple = ()           # the decision's candidate anchor ids, nearest first
    # (tokens estimated, anchor ids) -> the anchor weights of an estimate over those anchors
    # (kvcomm.EstimateWeights): they depend on the content and the anchors, not on the agent,
    # so the next agent's estimate over the same anchors takes them
    weights: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def shared_length(self) -> int:
        """The tokens the decision covers: the head, or all of them."""
        return self.length if self.head is None else self.head


@dataclass
class Reply:
    """An agent's reply: generated tokens that carry KV, and that KV (neutral)."""
    agent: str
    text: str
    ids: tuple[int, ...]
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class Prepared:
    """What a backend computed for a content before any call decided it (the server does it
    when the content's encoding lands, its first carrier still decoding): its distances to
    the slot's candidates, which the first call's decision takes while the candidates are the
    same anchors, and the anchor weights of its estimate over each set of anchors the
    agents would use (kvcomm.EstimateWeights; an agent's estimate takes those over its set)."""
    candidates: tuple             # anchor ids in pool order (AnchorPool.candidate_distances)
    distances: torch.Tensor       # float32 [len(candidates)], in the pool's distance form
    weights: tuple = ()
    # (m, candidates, distances) of its covered head, for a content too long for its slot's
    # pool (kvcomm.plan.decide.head_length); its weights are then over those m tokens
    head: tuple | None = None


@dataclass
class Session:
    """One multi-agent request. Keys: contents (slot, ids); encoded (kind, ids)."""
    index: int
    round: int = 0
    contents: dict = field(default_factory=dict)   # (slot, ids) -> Content
    encoded: dict = field(default_factory=dict)    # (kind, ids) -> (k, v) header encodings
    current: dict = field(default_factory=dict)    # agent -> Reply, this round
    history: dict = field(default_factory=dict)    # agent -> Reply, previous round
    late_plans: list = field(default_factory=list)  # call plans whose first-carried slots wait for a base
    # (slot, ids) -> what a backend computed for a content before its first call (Prepared)
    prepared: dict = field(default_factory=dict)

    def next_round(self) -> None:
        self.round += 1
        self.history = self.current
        self.current = {}

    def advance_to(self, rnd: int) -> None:
        """Moves to round `rnd` (a later round's call arrived): replies age per round."""
        while self.round < rnd:
            self.next_round()


def _same_segment(real: PromptLayout, template: PromptLayout, i: int) -> bool:
    """Segment i of `real` has the template's tokens, except at positions where a content's
    trailing whitespace merged into the segment's first token (recomputed on every call)."""
    a, b = real.segments[i]
    ta, tb = template.segments[i]
    if b - a != tb - ta:
        return False
    merged = set(real.merged)
    return all(p in merged or real.ids[p] == template.ids[ta + p - a] for p in range(a, b))


def agent_key(name: str, system_prompt: str, template: str) -> str:
    """The agent's identity in the pool: name@hash(system prompt, template). Deltas depend on
    the agent's prefix and segments: a changed definition gets a new identity, so a saved
    pool never feeds stale deltas to it."""
    digest = hashlib.sha1(f"{system_prompt}\0{template}".encode()).hexdigest()[:8]
    return f"{name}@{digest}"


@dataclass
class AgentState:
    name: str
    key: str                      # the agent's identity in the pool (deltas are recorded under it)
    system_prompt: str
    template: Template
    layout: PromptLayout          # of the marker render
    frame: ChatFrame | None = None   # the chat text around the user turn (backends that render)
    problem: str | None = None    # why no call of this agent can reuse (template edges merge)
    s0_k: torch.Tensor | None = None
    s0_v: torch.Tensor | None = None
    seg_k: list = field(default_factory=list)   # neutral [L,H,S,D] per placeholder, None if S == 0
    seg_v: list = field(default_factory=list)
    setup_ms: float = 0.0
    # The template's identity, what a backend keeps the S0 and segment KV under. For a
    # declared agent both are agent_key(name, system prompt, template); an agent inferred
    # from chat messages has one pool identity and a template per request shape.
    template_key: str = ""

    def __post_init__(self):
        self.template_key = self.template_key or self.key

    @property
    def s0(self) -> int:
        return 0 if self.s0_k is None else self.s0_k.shape[2]

    def alignment_problem(self, real: PromptLayout) -> str | None:
        """Why `real` cannot use this agent's S0/segment KV, or None."""
        if self.problem:
            return self.problem
        t = self.layout
        if real.s0 != t.s0 or real.ids[:real.s0] != t.ids[:t.s0]:
            return "prefix S0 tokens differ from the template's"
        if len(real.spans) != len(t.spans):
            return f"the prompt has {len(real.spans)} slots, the template {len(t.spans)}"
        for i, (name, _, _) in enumerate(real.spans):
            if name != t.spans[i][0]:
                return f"slot {i} is {name}, the template's is {t.spans[i][0]}"
            if not _same_segment(real, t, i):
                return f"segment after slot {name}: tokens differ from the template's"
        if real.ids[-1] != t.ids[-1]:
            return "last prompt token differs from the template's"
        return None

    def exact_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of a prompt `ids` equal this agent's S0 (at most all but the
        last prompt token): the exact prefix both paths copy instead of computing."""
        if self.s0_k is None:
            return 0
        ref = self.layout.ids
        limit = min(self.s0, len(ids) - 1)
        p = 0
        while p < limit and ids[p] == ref[p]:
            p += 1
        return p


def agent_from_template_kv(name: str, key: str, system_prompt: str, template: Template, layout: PromptLayout,
                           k: torch.Tensor | None, v: torch.Tensor | None, inv_freq: torch.Tensor,
                           frame: ChatFrame | None = None, template_key: str = "") -> AgentState:
    """The agent as the planner keeps it, from the KV k, v [L,H,>=T-1,D] (absolute positions)
    of one forward over its marker render `layout`. A layout with a problem (a placeholder
    edge inside a token) keeps no KV: no call of this agent can reuse, and says why."""
    state = AgentState(name=name, key=key, system_prompt=system_prompt, template=template, layout=layout,
                       frame=frame, template_key=template_key)
    if layout.problem:
        state.problem = f"template: {layout.problem}"
        return state
    state.s0_k = k[:, :, :layout.s0].contiguous().clone()
    state.s0_v = v[:, :, :layout.s0].contiguous().clone()
    for a, b in layout.segments:
        pair = neutral_span(k, v, a, b, inv_freq) if b > a else (None, None)
        state.seg_k.append(pair[0])
        state.seg_v.append(pair[1])
    return state


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct tensors inside `objs` (tensors, and lists, tuples, dicts and
    dataclass objects holding them); a tensor shared by two places counts once."""
    seen: set = set()
    total = 0
    stack = list(objs)
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.device)
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
        elif hasattr(x, "__dataclass_fields__"):
            stack.extend(getattr(x, f) for f in x.__dataclass_fields__)
    return total


class Sessions:
    """Sessions by id (a server sees conversations start and never sees them end): the least
    recently used forgotten past `limit` sessions or `max_bytes` of KV they hold (content
    bases, encodings, replies; the one in use is never dropped)."""

    def __init__(self, limit: int = 1024, max_bytes: int | None = None):
        if limit < 1:
            raise ValueError(f"Sessions: limit must be >= 1, got {limit}")
        self.limit = int(limit)
        self.max_bytes = max_bytes
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._last: str | None = None
        self._made = 0
        self.dropped = 0

    def get(self, sid: str, rnd: int = 0) -> Session:
        """The session `sid` (made on first use), moved to round `rnd` if it is behind."""
        st = self._by_id.get(sid)
        if st is None:
            self._made += 1
            st = self._by_id[sid] = Session(index=self._made)
        self._by_id.move_to_end(sid)
        st.advance_to(rnd)
        if self.max_bytes is not None:
            # A session grows while it is in use (its call's bases, its replies): it is counted
            # again when the next session is asked for, and the others as last counted.
            for counted in {sid, self._last}:
                if counted in self._by_id:
                    self._bytes[counted] = self._count(self._by_id[counted])
        self._last = sid
        while len(self._by_id) > self.limit or (self.max_bytes is not None and len(self._by_id) > 1
                                                and sum(self._bytes.values()) > self.max_bytes):
            old, _ = self._by_id.popitem(last=False)
            self._bytes.pop(old, None)
            self.dropped += 1
        return st

    @staticmethod
    def _count(st: Session) -> int:
        return tensor_bytes(st.contents, st.encoded, st.current, st.history, [p.late for p in st.late_plans])

    @property
    def bytes(self) -> int:
        """KV held by the sessions, as counted when each was last in use."""
        return sum(self._bytes.values())

    def __contains__(self, sid: str) -> bool:
        return sid in self._by_id

    def all(self) -> list[Session]:
        """The sessions held, least recently used first (a copy: safe to walk while they change)."""
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
