"""One agent call, planned: decide each slot, choose the path, assemble the estimated KV,
record deltas, capture the reply (docs/method.md, "Deciding" to "Beyond the paper").

The planner is the method's per-call logic, written once for both backends. It works on
plain KV buffers [layers, kv_heads, tokens, head_dim] indexed by absolute prompt position,
and imports neither transformers nor vLLM: KVCommEngine (transformers) and the vLLM
connector are adapters that move KV between their caches and these buffers and run the
model where the plan says.

One call:
1. `plan`: why the call cannot reuse at all (a layout problem, RoPE moves not exact that
   far, a prompt that does not match the agent's template), else each slot's content base
   (a captured reply, a header encoding, or `encode` - the backend runs the model) and its
   share-or-anchor decision, once per session; a slot is *estimated* when it shares and the
   pool holds deltas for this agent, else *computed*. The path: reuse (every slot
   estimated), partial (some), dense (none, or some computed and partial calls are off);
   and the prompt positions the model runs (the recompute policy's, plus every computed
   slot and its segment).
2. `assemble`: the exact S0 and every estimated slot (with the agent's segment after it)
   written into the backend's buffers; a slot whose anchors were evicted since the decision
   becomes computed (the plan is updated).
3. the backend runs the model over `plan.positions` against those buffers (dense: the
   prompt after the exact prefix `plan.s0`);
4. `record`: computed slots' KV -> neutral-frame deltas into their anchors;
5. `capture`: the reply's KV becomes the base of {agent_<name>_current}, decided at once.

A backend that can only take cached KV for a *prefix* of the prompt and computes every
token after it (vLLM's connector interface) sets `PlanSettings(prefix_only=True)`: after
the first computed slot every later slot is computed too, and only recompute policies
whose positions form a suffix of the prompt (tail=N) can be expressed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .decide import HeadShare, RankGroup, decide_content
from .defaults import DEFAULT_ESTIMATE_ANCHORS, DEFAULT_HEAD_SHARE, DEFAULT_PARTIAL
from .estimator_names import DEFAULT_ESTIMATOR, make_estimator
from .neutral import neutral_keys, neutral_span
from .recompute import RecomputePolicy, SlotPlan, select_positions
from .state import AgentState, Content, Reply, Session
from .template import CONTENT_KIND, CURRENT, HISTORY, PromptLayout, classify

NO_BASE = "no base KV (content not encoded and no captured reply)"
PREFIX_ONLY = "prefix caching only (estimator none): computed after the exact prefix"
NO_DECISION = "not decided: the estimator uses no anchors"
FIRST_CARRIER = "first carrier: computed in context, encoded after this call for the agents after it"
AFTER_COMPUTED = "after a computed slot (the backend takes estimated KV for a prefix only)"
IN_PREFIX_CACHE = "in the backend's prefix cache (used as cached)"
ALL_CACHED = "every content in the backend's prefix cache: nothing to estimate"


@dataclass(frozen=True)
class PlanSettings:
    """How a call decides. partial: a call with some slots that cannot be estimated still
    estimates the others (else it runs dense); recompute: which further prompt tokens run
    through the model (kvcomm.plan.recompute); prefix_only: see the module docstring."""
    partial: bool = DEFAULT_PARTIAL
    recompute: RecomputePolicy = field(default_factory=RecomputePolicy)
    prefix_only: bool = False
    # The first call that carries a content the session has not encoded computes it in
    # context and encodes it after its own first token (plan.deferred), instead of encoding
    # it first: an encoding costs about what computing the content in context costs, so it
    # can only pay off for the agents after the first, and off their critical path.
    defer_first_encoding: bool = False
    # How estimated slots get their KV (kvcomm.plan.estimators): "anchors" (KVCOMM),
    # "base" (no offsets: what CacheBlend / EPIC start from), "none" (prefix caching only),
    # "fit" (anchor weights fitted to the content's base).
    estimator: str = DEFAULT_ESTIMATOR
    # A content with too few anchors as long as itself shares its first tokens when the pool
    # covers at least this fraction of it (kvcomm.plan.decide.decide_content); 0: the
    # published rule (it becomes an anchor and every consumer computes it).
    head_share: float = DEFAULT_HEAD_SHARE
    # An estimate uses at most this many of its slot's candidates, the nearest to the content
    # (0: all of them, as published).
    estimate_anchors: int = DEFAULT_ESTIMATE_ANCHORS

    def __post_init__(self):
        if isinstance(self.estimate_anchors, bool) or not isinstance(self.estimate_anchors, int) \
                or self.estimate_anchors < 0:
            raise ValueError(f"estimate_anchors must be an int >= 0 (0: every candidate), got {self.estimate_anchors!r}")
        if isinstance(self.head_share, bool) or not isinstance(self.head_share, (int, float)) \
                or not 0 <= self.head_share <= 1:
            raise ValueError(f"head_share must be a fraction in [0, 1] (0: off), got {self.head_share!r}")
        object.__setattr__(self, "recompute", RecomputePolicy.parse(self.recompute))
        make_estimator(self.estimator)   # an unknown name fails here, not at the first call
        p = self.recompute
        if self.prefix_only and p.inside:
            raise ValueError(f"recompute policy {p.describe()!r} chooses tokens inside the prompt, but this "
                             "backend takes estimated KV for a prefix of the prompt only and computes every token "
                             "after it: use 'none' or 'tail=N'")

    def describe(self) -> str:
        return (f"partial={'prefix' if self.prefix_only and self.partial else self.partial}, "
                f"recompute={self.recompute.describe()}, defer_first_encoding={self.defer_first_encoding}"
                + ("" if self.head_share == DEFAULT_HEAD_SHARE else f", head_share={self.head_share:g}")
                + ("" if self.estimate_anchors == DEFAULT_ESTIMATE_ANCHORS
                   else f", estimate_anchors={self.estimate_anchors}")
                + ("" if self.estimator == DEFAULT_ESTIMATOR else f", estimator={self.estimator}"))


@dataclass
class CallPlan:
    """What one call does and why. Slot indices follow the template's placeholders."""
    agent: AgentState
    layout: PromptLayout
    learn: bool
    contents: list = field(default_factory=list)    # Content per slot, None when it has no base
    slots: list = field(default_factory=list)       # SlotPlan per slot
    why: dict = field(default_factory=dict)         # slot index -> why it is computed
    missing: set = field(default_factory=set)       # slots that share, but no anchor has this agent's deltas
    heads: dict = field(default_factory=dict)       # slot index -> tokens estimated, where only a head is
    decisions: dict = field(default_factory=dict)   # slot name -> what was decided (for call records)
    anchors: dict = field(default_factory=dict)     # estimated slot name -> anchor ids used
    encoded_tokens: int = 0                         # content tokens this call encoded behind a header
    deferred: list = field(default_factory=list)    # (kind, ids) to encode after this call (first carrier)
    first_carrier: set = field(default_factory=set)  # slots this call carries first (not decided)
    late: dict = field(default_factory=dict)        # first-carried slot -> its neutral KV, until settle()
    refused: str | None = None                      # why the call could not reuse at all
    path: str = "dense"                             # "reuse", "partial" or "dense"
    reason: str = ""
    s0: int = 0                                     # exact prefix tokens copied from the agent's S0
    positions: list = field(default_factory=list)   # prompt positions the model runs
    recomputed: dict = field(default_factory=dict)  # reuse / partial: group -> positions it added
    deviation: object = None                        # per position after s0: the probe's deviation
    probed: int = 0                                 # tokens the probe ran (through its layers only)
    cached_edge: tuple | None = None                # a cached slot's segment positions after the cache

    @property
    def computed(self) -> set[int]:
        """Slots the model computes, all of them or after an estimated head."""
        return {i for i, s in enumerate(self.slots) if s.computed_from is not None}

    @property
    def any_estimated(self) -> bool:
        return any(s.estimated and not s.cached for s in self.slots)

    @property
    def uses_estimates(self) -> bool:
        """Whether the model runs against assembled KV (reuse / partial), not a dense prefill."""
        return self.path != "dense"

    @property
    def prefix(self) -> int:
        """Prompt tokens before the first one the model runs: the KV a prefix-only backend is given."""
        return self.positions[0] if self.positions else self.s0

    @property
    def gates(self) -> dict:
        return {c.slot: c.gate for c in self.contents if c is not None}

    def slot_reasons(self) -> str:
        """Why slots are computed, in slot order ('' when none is)."""
        return "; ".join(f"slot {self.slots[i].name}: {self.why[i]}" for i in sorted(self.why))


def _add(positions: set, counts: dict, group: str, more) -> None:
    new = [p for p in more if p not in positions]
    if new:
        positions.update(new)
        counts[group] = counts.get(group, 0) + len(new)


class Planner:
    """The per-call steps over one anchor pool. rope: anything with `inv_freq` (float32
    [head_dim/2]), `exact_positions` (None: key moves exact everywhere) and `rope_type`
    (a kvcomm.hf.ModelSpec does); group: the tensor-parallel ranks deciding together."""

    def __init__(self, pool, rope, settings: PlanSettings | None = None, *, group: RankGroup | None = None):
        self.pool = pool
        self.rope = rope
        self.settings = settings or PlanSettings()
        self.group = group
        self._estimator = None

    @property
    def estimator(self):
        """The settings' estimator (kvcomm.plan.estimators), made once per name."""
        name = self.settings.estimator
        if self._estimator is None or self._estimator.name != name:
            self._estimator = make_estimator(name)
        return self._estimator

    @property
    def head_share(self) -> HeadShare | None:
        """The settings' head sharing, where the estimator can estimate a head (None: off)."""
        f = self.settings.head_share if self.estimator.estimates_heads else 0.0
        return HeadShare(f) if f else None   # stateless: a hash of each content decides

    @property
    def captures(self) -> bool:
        """Whether replies are captured as bases (not for prefix caching only)."""
        return self.estimator.reuses

    # ------------------------------------------------------------------ step 1: plan

    def refusal(self, agent: AgentState, lay: PromptLayout, max_new_tokens: int) -> str | None:
        """Why no part of this call can reuse, or None."""
        if lay.problem:
            return lay.problem
        exact = self.rope.exact_positions
        if exact is not None and lay.length + max_new_tokens > exact:
            return (f"prompt + reply longer than {exact} positions, where {self.rope.rope_type} RoPE key moves "
                    "stop being exact")
        return agent.alignment_problem(lay)

    def plan(self, agent: AgentState, lay: PromptLayout, session: Session, *, max_new_tokens: int,
             encode=None, learn: bool = True, refusal: str | None = None, laps=None,
             deferred: frozenset = frozenset(), cached: int = 0) -> CallPlan:
        """The call's plan. encode(kind, ids) -> neutral (k, v): the backend encodes a content
        behind its kind's header (None: contents the session lacks have no base and are
        computed). refusal: a reason the caller already has to run dense (nothing is decided).
        laps: an object whose lap(step) is called after each base ("encode") and decision
        ("decide"), for the caller's timings. deferred: slots whose content the backend
        encodes after this call, their first carrier (with defer_first_encoding the planner
        picks them itself and lists them in plan.deferred). cached: prompt tokens the backend
        already holds from its own prefix cache (vLLM: an earlier request of the same tenant
        with the same tokens, e.g. the agent's previous turn); a slot that lies before it with
        is used as cached - not decided, estimated or recorded - since its KV there may itself
        be an earlier call's estimate; the part of its segment after `cached` is computed (so,
        for a prefix-only backend, everything after it)."""
        plan = CallPlan(agent=agent, layout=lay, learn=learn)
        plan.refused = refusal or self.refusal(agent, lay, max_new_tokens)
        if plan.refused is None:
            for i, (name, a, b) in enumerate(lay.spans):
                if b <= cached:
                    if lay.segments[i][1] > cached:   # the rest of its segment is computed
                        plan.cached_edge = (cached, lay.segments[i][1])
                    plan.contents.append(None)
                    plan.slots.append(SlotPlan(name=name, span=(a, b), segment=tuple(lay.segments[i]),
                                               estimated=True, cached=True))
                    plan.decisions[name] = IN_PREFIX_CACHE
                    continue
                content = self._content(plan, session, name, tuple(lay.ids[a:b]), encode, learn, laps,
                                        name in deferred)
                plan.contents.append(content)
                estimated = self._estimable(plan, i, content)
                plan.slots.append(SlotPlan(name=name, span=(a, b), segment=tuple(lay.segments[i]),
                                           estimated=estimated, head=plan.heads.get(i) if estimated else None))
            self._prefix_only(plan)
        self._finish(plan)
        return plan

    def _content(self, plan: CallPlan, session: Session, slot: str, ids: tuple, encode, learn: bool,
                 laps, deferred: bool) -> Content | None:
        found = session.contents.get((slot, ids))
        if found is not None:
            return found
        est = self.estimator
        if not est.reuses:
            return None
        defer = deferred or (self.settings.defer_first_encoding and encode is not None)
        base = self._base(plan, session, slot, ids, None if defer else encode)
        if laps is not None:
            laps.lap("encode")
        if base is None:
            if defer:
                plan.deferred.append((CONTENT_KIND[classify(slot).kind], ids))
                plan.first_carrier.add(slot)
            return None
        if not est.uses_anchors:
            content = session.contents[(slot, ids)] = Content(slot, tuple(ids), base[0], base[1], base[2],
                                                              share=True, reason=NO_DECISION)
            return content
        content = decide_content(self.pool, slot, ids, base[0], base[1], base[2], learn=learn, group=self.group,
                                 head=self.head_share, prepared=session.prepared.pop((slot, ids), None))
        session.contents[(slot, ids)] = content
        if laps is not None:
            laps.lap("decide")
        return content

    @staticmethod
    def _base(plan: CallPlan, session: Session, slot: str, ids: tuple, encode):
        """(k, v, source) of the content `ids` of `slot`, or None."""
        ph = classify(slot)
        if ph.kind in (CURRENT, HISTORY):
            rep = (session.current if ph.kind == CURRENT else session.history).get(ph.owner)
            if rep is not None and rep.ids == ids:
                return rep.k, rep.v, "reply"
        kind = CONTENT_KIND[ph.kind]
        enc = session.encoded.get((kind, ids))
        if enc is None and encode is not None:
            enc = session.encoded[(kind, ids)] = encode(kind, ids)
            plan.encoded_tokens += len(ids)
        return None if enc is None else (enc[0], enc[1], "header")

    def _estimable(self, plan: CallPlan, i: int, c: Content | None) -> bool:
        name = plan.layout.spans[i][0]
        if not self.estimator.reuses:
            plan.decisions[name] = PREFIX_ONLY
            plan.why[i] = "prefix caching only"
            return False
        if c is None and name in plan.first_carrier:
            plan.decisions[name] = FIRST_CARRIER
            plan.why[i] = "first carrier"
            return False
        if c is None:
            plan.decisions[name] = NO_BASE
            plan.why[i] = "no base KV"
            return False
        if self.estimator.falls_back and self._learned(plan.agent, c) and not (c.share and any(
                a.length >= c.length and plan.agent.key in a.agents for a in self.pool.anchors(c.slot))):
            plan.decisions[name] = (f"{c.reason if not c.share else 'share, but no anchor has deltas for this agent'}"
                                    f"; estimated from its moved base (estimator {self.estimator.name})")
            return True
        if not c.share:
            plan.decisions[name] = f"{c.reason} (new anchor)" if c.anchor_id is not None else \
                f"{c.reason} (not learning: no anchor added)"
            plan.why[i] = c.reason
            return False
        if not self.estimator.uses_anchors:
            plan.decisions[name] = f"estimated without anchors (estimator {self.estimator.name})"
            return True
        if not self._has_deltas(plan.agent, c):
            plan.decisions[name] = "share, but no anchor has deltas for this agent"
            plan.missing.add(i)
            plan.why[i] = "no deltas for agent"
            return False
        if c.head is not None:
            plan.heads[i] = c.head
            plan.decisions[name] = f"share first {c.head} of {c.length} tokens"
            plan.why[i] = f"tokens {c.head}-{c.length} computed (too few candidates that long)"
            return True
        plan.decisions[name] = "share"
        return True

    def _learned(self, agent: AgentState, c: Content) -> bool:
        """Whether the slot's pool holds min_anchors anchors with this agent's deltas (any length):
        an estimator that falls back to the moved base does so only then, and computes (and
        teaches the pool) before."""
        with_deltas = sum(1 for a in self.pool.anchors(c.slot) if agent.key in a.agents)
        return with_deltas >= self.pool.config.min_anchors

    def _prefix_only(self, plan: CallPlan) -> None:
        """A prefix-only backend computes every slot after the first computed position (a
        computed slot, or a segment token that took in a content's trailing whitespace)."""
        if not self.settings.prefix_only:
            return
        edge = [] if plan.cached_edge is None else [plan.cached_edge[0]]
        first = min([s.computed_from for s in plan.slots if s.computed_from is not None]
                    + list(plan.layout.merged) + edge, default=plan.layout.length)
        for i, s in enumerate(plan.slots):
            if s.estimated and s.span[0] >= first:
                s.estimated = False
                plan.decisions[s.name] += f"; computed: {AFTER_COMPUTED}"
                plan.why[i] = AFTER_COMPUTED

    def _finish(self, plan: CallPlan) -> None:
        """Path, reason and positions from the slots' states."""
        lay, T = plan.layout, plan.layout.length
        computed = plan.computed
        dense = (plan.refused is not None or (plan.contents and not plan.any_estimated)
                 or (computed and not self.settings.partial))
        if dense:
            plan.path = "dense"
            plan.reason = plan.refused or plan.slot_reasons() or (
                ALL_CACHED if plan.slots and all(s.cached for s in plan.slots) else "")
            plan.s0 = plan.agent.exact_prefix(lay.ids)
            plan.positions = list(range(plan.s0, T))
            plan.recomputed = {}
            return
        s0 = plan.agent.s0
        sel = select_positions(self.settings.recompute, plan.slots, s0, T, deviation=plan.deviation)
        positions, counts = set(sel.positions), dict(sel.counts)
        _add(positions, counts, "merged", (p for p in lay.merged if p >= s0))
        if plan.cached_edge is not None:
            _add(positions, counts, "slots", range(*plan.cached_edge))
        if self.settings.prefix_only:   # everything after the first computed position
            _add(positions, counts, "suffix", range(min(positions), T))
        plan.path = "partial" if computed else "reuse"
        plan.reason = (f"partial: {plan.slot_reasons()}" if computed else
                       "all slots shared" if plan.slots else "no slots: exact prefix")
        plan.s0 = s0
        plan.positions, plan.recomputed = sorted(positions), counts

    # ------------------------------------------------------------------ step 2: assemble

    def write_prefix(self, plan: CallPlan, k, v) -> None:
        """The exact prefix (plan.s0 tokens of the agent's S0) into k, v."""
        s0 = plan.s0
        if s0:
            k[:, :, :s0].copy_(plan.agent.s0_k[:, :, :s0])
            v[:, :, :s0].copy_(plan.agent.s0_v[:, :, :s0])

    def assemble(self, plan: CallPlan, k, v) -> CallPlan:
        """Writes the exact S0 and every estimated slot (with its segment) into k, v
        [L,H,>=T-1,D]; one pool call per slot covers all layers. A slot the pool cannot
        estimate after all becomes computed, and the plan's path and positions follow
        (it can turn dense: then the caller prefills after plan.s0)."""
        if not plan.uses_estimates:
            return plan
        self.write_prefix(plan, k, v)
        agent, spread = plan.agent, self.settings.recompute.spread
        lost = False
        for i, slot in enumerate(plan.slots):
            if not slot.estimated or slot.cached:
                continue
            if lost:   # prefix-only: a slot before this one became computed
                slot.estimated = False
                plan.decisions[slot.name] += f"; computed: {AFTER_COMPUTED}"
                plan.why[i] = AFTER_COMPUTED
                continue
            used = self.estimator.write(self, plan, i, k, v, want_spread=spread)
            if used is None:   # its anchors were evicted since the decision
                slot.estimated = False
                plan.decisions[slot.name] = "share, but no usable anchor for this agent"
                plan.missing.add(i)
                plan.why[i] = "no usable anchor for agent"
                lost = self.settings.prefix_only
                continue
            if used:
                plan.anchors[slot.name] = used
                head = "" if slot.head is None else f" first {slot.head} of {slot.span[1] - slot.span[0]} tokens"
                plan.decisions[slot.name] = f"share{head} (estimated from anchors {used})"
        self._finish(plan)
        return plan

    # ------------------------------------------------------------------ step 2b: probe (deviation)

    def wants_probe(self, plan: CallPlan) -> bool:
        """Whether the backend must probe the early layers before running plan.positions
        (recompute 'deviation'): then it runs layers 0..probe_layer over probe_positions
        against the assembled KV and hands the deviations to apply_probe."""
        return plan.uses_estimates and self.settings.recompute.wants_probe and plan.deviation is None

    @property
    def probe_layer(self) -> int:
        return self.settings.recompute.layer

    def probe_positions(self, plan: CallPlan) -> list[int]:
        """Every prompt position after the exact prefix: CacheBlend's candidates are all tokens."""
        return list(range(plan.s0, plan.layout.length))

    def apply_probe(self, plan: CallPlan, deviation) -> CallPlan:
        """deviation: per position of probe_positions (float tensor or sequence); the plan's
        positions then include the budget's most deviating tokens."""
        if len(deviation) != plan.layout.length - plan.s0:
            raise ValueError(f"apply_probe: {len(deviation)} deviations for {plan.layout.length - plan.s0} "
                             "positions after the exact prefix")
        plan.deviation = deviation
        plan.probed = len(deviation)
        self._finish(plan)
        return plan

    def encode_deferred(self, plan: CallPlan, session: Session, encode) -> int:
        """After the call: encodes the contents it carried first (plan.deferred) for the
        agents after it. Returns the content tokens encoded."""
        n = 0
        for kind, ids in plan.deferred:
            if (kind, ids) not in session.encoded:
                session.encoded[(kind, ids)] = encode(kind, ids)
                n += len(ids)
        return n

    # ------------------------------------------------------------------ step 4: record

    def record(self, plan: CallPlan, k, v, offset: int = 0) -> int:
        """The computed slots' KV in k, v [L,H,n,D] (a dense call's real KV, a partial call's KV
        given the estimated slots before it; index 0 holds prompt position `offset`, at most
        record_start(plan)) -> neutral-frame deltas into their anchors. Returns how many
        slots recorded."""
        recorded = 0
        for i in self._recorded(plan):
            c = plan.contents[i]
            if c is None:   # carried first: its base comes after the call (settle)
                plan.late[i] = self._slot_kv(plan, i, k, v, offset)
                continue
            recorded += self._record_slot(plan, i, c, k, v, offset=offset)
        return recorded

    def record_start(self, plan: CallPlan) -> int | None:
        """The first prompt position record() reads (a partial call's computed slots sit at the
        end of the prompt: a caller reading the KV back reads from there); None when it
        records nothing."""
        firsts = []
        for i in self._recorded(plan):
            _, a, _ = plan.layout.spans[i]
            sa, sb = plan.layout.segments[i]
            firsts.append(min(a, sa) if sb > sa else a)
        return min(firsts, default=None)

    def _recorded(self, plan: CallPlan) -> list[int]:
        """The slots record() takes: every content of a dense call, a partial call's computed
        ones; of those without a decided content, the ones the call carried first."""
        if not plan.learn or plan.refused is not None or not self.estimator.uses_anchors:
            return []
        which = range(len(plan.contents)) if plan.path == "dense" else sorted(plan.computed)
        return [i for i in which if plan.contents[i] is not None or plan.slots[i].name in plan.first_carrier]

    def settle(self, plan: CallPlan, session: Session) -> int:
        """The slots this call carried first (computed in context, their KV kept by record)
        whose base the session has now: decided as their first carrier would have decided
        them, and their deltas recorded - so a content only one agent ever reads still
        teaches the pool. Returns how many slots recorded."""
        recorded = 0
        lay = plan.layout
        for i in sorted(plan.late):
            name, a, b = lay.spans[i]
            ids = tuple(lay.ids[a:b])
            base = session.encoded.get((CONTENT_KIND[classify(name).kind], ids))
            if base is None:
                continue
            kv = plan.late.pop(i)
            c = session.contents.get((name, ids))
            if c is None:
                c = session.contents[(name, ids)] = decide_content(
                    self.pool, name, ids, base[0], base[1], "header", learn=plan.learn, group=self.group,
                    head=self.head_share, prepared=session.prepared.pop((name, ids), None))
            if c.share and c.anchor_id is None and not self._has_deltas(plan.agent, c):
                plan.missing.add(i)
            plan.contents[i] = c
            recorded += self._record_slot(plan, i, c, *kv, neutral=True)
        return recorded

    def _has_deltas(self, agent: AgentState, c: Content) -> bool:
        return any(a.length >= c.shared_length and agent.key in a.agents for a in self.pool.anchors(c.slot))

    def _slot_kv(self, plan: CallPlan, i: int, k, v, offset: int = 0) -> tuple:
        """Neutral-frame copies of slot i's KV and of its segment's (None, None without one);
        k, v hold the prompt from position `offset`."""
        _, a, b = plan.layout.spans[i]
        sa, sb = plan.layout.segments[i]
        inv_freq = self.rope.inv_freq
        seg = neutral_span(k, v, sa, sb, inv_freq, offset) if sb > sa else (None, None)
        return (*neutral_span(k, v, a, b, inv_freq, offset), *seg)

    def _record_slot(self, plan: CallPlan, i: int, c: Content, k, v, seg_k=None, seg_v=None, *,
                     neutral: bool = False, offset: int = 0) -> int:
        """Slot i's deltas into c's anchor (k, v: the prompt's buffers from position `offset`,
        or with neutral=True the slot's and its segment's neutral KV). 1 when recorded."""
        lay, agent = plan.layout, plan.agent
        name = lay.spans[i][0]
        slot = plan.slots[i]
        whole = c.head is not None and (plan.path == "dense" or slot.computed_from == slot.span[0])
        if c.anchor_id is None and (i in plan.missing or whole):
            # Shared content, but no anchor holds this agent's deltas: the content becomes an
            # anchor so the agent has something to record into. A content that shares only its
            # head, computed whole by this call anyway, becomes one too: the pool learns its
            # length at no extra cost.
            c.anchor_id = self.pool.add_anchor(c.slot, c.base_k, c.base_v)
            plan.decisions[name] += " (new anchor)"
        if c.anchor_id is None:
            return 0
        ph_k, ph_v, seg_k, seg_v = (k, v, seg_k, seg_v) if neutral else self._slot_kv(plan, i, k, v, offset)
        ph_k, ph_v = ph_k - c.base_k, ph_v - c.base_v
        if seg_k is not None:
            sa, _ = lay.segments[i]
            seg_k, seg_v = seg_k - agent.seg_k[i], seg_v - agent.seg_v[i]
            for p in lay.merged:   # another token than the template's there: no offset to learn
                if sa <= p < sa + seg_k.shape[2]:
                    seg_k[:, :, p - sa].zero_()
                    seg_v[:, :, p - sa].zero_()
        try:
            self.pool.record_deltas(c.slot, c.anchor_id, agent.key, ph_k, ph_v, seg_k, seg_v)
            return 1
        except RuntimeError as e:  # the anchor was evicted since it was added
            plan.decisions[name] += f"; deltas not recorded: {str(e).splitlines()[0]}"
            return 0

    # ------------------------------------------------------------------ step 5: capture

    def capture(self, session: Session, agent: str, ids, k, v, start: int, *, text: str = "",
                learn: bool = True) -> Content:
        """A reply's content tokens `ids` with their KV k, v [L,H,n,D] (the first token at
        absolute position `start`): the base of {agent_<agent>_current} in this session,
        decided against that slot's pool now (once per session and content)."""
        ids = tuple(int(t) for t in ids)
        if k.shape[2] != len(ids) or v.shape[2] != len(ids):
            raise ValueError(f"capture: {len(ids)} reply tokens but KV of {k.shape[2]} / {v.shape[2]} tokens")
        nk, nv = neutral_keys(k, start, self.rope.inv_freq), v.contiguous().clone()
        session.current[agent] = Reply(agent, text, ids, nk, nv)
        slot = f"agent_{agent}_current"
        content = session.contents.get((slot, ids))
        if content is None and not self.estimator.uses_anchors:
            content = session.contents[(slot, ids)] = Content(slot, ids, nk, nv, "reply", share=True,
                                                              reason=NO_DECISION)
        if content is None:
            content = session.contents[(slot, ids)] = decide_content(self.pool, slot, ids, nk, nv, "reply",
                                                                     learn=learn, group=self.group,
                                                                     head=self.head_share)
        return content
