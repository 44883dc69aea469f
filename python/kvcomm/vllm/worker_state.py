"""KVCOMM's state on one vLLM worker: agents, sessions, the anchor pool, per-call plans.

The connector's worker side reads KV out of vLLM's paged cache and writes KV into it
(paged.py); everything in between is here, on dense [layers, kv_heads, tokens,
head_dim] tensors of this rank's heads, with the steps the Hugging Face engine uses
(kvcomm.engine.buffer_paths, kvcomm.engine.agent, kvcomm.engine.request):

- an agent's exact S0 and neutral template segments come from the template request's
  prefill (vLLM computed it; the front end sent the prompt rendered with the
  placeholder markers in place, as KVCommEngine.add_agent renders it);
- a content's base comes from an encode request's prefill (the content behind its
  kind's header) or from the sender's reply, read back from the sender's blocks;
- plan(): the share-or-anchor decision of every slot (once per session and content,
  like one engine request), then either the reuse path (S0 + estimates assembled into
  a staging buffer the load step writes into the call's blocks) or the dense path (the
  call's real prefill after the exact S0, whose KV record() turns into deltas).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..engine import buffer_paths as paths
from ..engine.agent import AgentState
from ..engine.kv import neutral_keys
from ..engine.request import Reply, RequestState
from ..engine.template import CONDITION, CURRENT, HISTORY, QUESTION, PromptLayout, classify, parse_template
from .tp import RankGroup, reduced_decide

KIND_OF = {QUESTION: "question", CONDITION: "condition", CURRENT: "reply", HISTORY: "reply"}


@dataclass
class CallLayout:
    """An agent call's prompt as the server's front end laid it out (token positions)."""
    agent_key: str
    agent_name: str
    session: str
    round: int
    learn: bool
    spans: list           # [(slot, start, stop)] token ranges of the placeholders
    segments: list        # [(start, stop)] the text after each placeholder
    s0: int
    problem: str | None   # why the layout cannot reuse (a slot edge inside a token), else None
    max_tokens: int


@dataclass
class PlanResult:
    path: str                  # "reuse" or "dense"
    reason: str
    prefix: int                # tokens the connector writes: T-1 (reuse) or the exact S0 prefix (dense)
    slots: dict = field(default_factory=dict)    # slot -> what was decided
    gates: dict = field(default_factory=dict)    # slot -> the decision's numbers


@dataclass
class _DensePlan:
    agent: AgentState
    lay: PromptLayout
    contents: list
    missing: set
    slots: dict


@dataclass
class WorkerStats:
    reuse: int = 0
    dense: int = 0
    templates: int = 0
    encodings: int = 0
    captures: int = 0
    records: int = 0
    reasons: dict = field(default_factory=dict)


class WorkerState:
    """spec: kvcomm.hf.ModelSpec of this rank (kv_heads = the heads it holds)."""

    def __init__(self, spec, pool, group: RankGroup | None = None, max_sessions: int = 1024):
        self.spec = spec
        self.pool = pool
        self.group = group or RankGroup(1)
        self.max_sessions = max_sessions
        self.agents: dict[str, AgentState] = {}
        self.sessions: OrderedDict[str, RequestState] = OrderedDict()
        self.staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dense: dict[str, _DensePlan] = {}
        self.stats = WorkerStats()

    # ------------------------------------------------------------------ sessions

    def session(self, sid: str, rnd: int = 0) -> RequestState:
        st = self.sessions.get(sid)
        if st is None:
            st = self.sessions[sid] = RequestState(index=len(self.sessions) + 1)
            while len(self.sessions) > self.max_sessions:  # least recently used goes
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(sid)
        while st.round < rnd:   # this round's replies become the next round's history
            st.next_round()
        return st

    def _decide(self, slot: str, ids: tuple, k, v, source: str, learn: bool):
        decide = None
        if self.group.world_size > 1:
            decide = lambda s, val: reduced_decide(self.pool, s, val, self.group)  # noqa: E731
        return paths.decide_content(self.pool, slot, ids, k, v, source, decide=decide, learn=learn)

    # ------------------------------------------------------------------ saves (KV read back)

    def add_template(self, key: str, name: str, system: str, template_text: str, lay: PromptLayout,
                     k: torch.Tensor, v: torch.Tensor) -> None:
        """The agent's S0 and segment KV from the marker render's prefill (k, v [L,H,>=T-1,D])."""
        if key in self.agents:
            return
        state = AgentState(name=name, key=key, system_prompt=system, template=parse_template(template_text),
                           frame=None, layout=lay)
        if lay.problem:
            state.problem = f"template: {lay.problem}"
        else:
            state.s0_k = k[:, :, :lay.s0].contiguous().clone()
            state.s0_v = v[:, :, :lay.s0].contiguous().clone()
            for a, b in lay.segments:
                if b > a:
                    state.seg_k.append(neutral_keys(k[:, :, a:b], a, self.spec.inv_freq))
                    state.seg_v.append(v[:, :, a:b].contiguous().clone())
                else:
                    state.seg_k.append(None)
                    state.seg_v.append(None)
        self.agents[key] = state
        self.stats.templates += 1

    def add_encoding(self, sid: str, kind: str, ids: tuple, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """A content encoded behind its header: k, v [L,H,n,D] of its tokens, the first at `start`."""
        st = self.session(sid)
        st.encoded.setdefault((kind, tuple(ids)), (neutral_keys(k, start, self.spec.inv_freq), v.contiguous().clone()))
        self.stats.encodings += 1

    def add_reply(self, call: CallLayout, ids: tuple, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """A call's reply tokens that carry KV (k, v [L,H,n,D], the first at `start`):
        the base of {agent_<name>_current}, decided against that slot's pool now, as the
        engine does when it captures a reply."""
        st = self.session(call.session, call.round)
        ids = tuple(ids)
        nk = neutral_keys(k, start, self.spec.inv_freq)
        nv = v.contiguous().clone()
        st.current[call.agent_name] = Reply(call.agent_name, "", ids, nk, nv)
        slot = f"agent_{call.agent_name}_current"
        if (slot, ids) not in st.contents:
            st.contents[(slot, ids)] = self._decide(slot, ids, nk, nv, "reply", call.learn)
        self.stats.captures += 1

    # ------------------------------------------------------------------ planning

    def _base(self, st: RequestState, slot: str, ids: tuple):
        """(content already decided this session, or None; else its base (k, v, source), or None)."""
        found = st.contents.get((slot, ids))
        if found is not None:
            return found, None
        ph = classify(slot)
        if ph.kind in (CURRENT, HISTORY):
            rep = (st.current if ph.kind == CURRENT else st.history).get(ph.owner)
            if rep is not None and rep.ids == ids:
                return None, (rep.k, rep.v, "reply")
        enc = st.encoded.get((KIND_OF[ph.kind], ids))
        return None, (None if enc is None else (enc[0], enc[1], "header"))

    def _dense(self, req_id: str, reason: str, agent: AgentState | None, ids: list, slots: dict,
               gates: dict) -> PlanResult:
        prefix = 0
        if agent is not None and agent.s0_k is not None:
            ref = agent.layout.ids
            limit = min(agent.s0, len(ids) - 1)
            while prefix < limit and ids[prefix] == ref[prefix]:
                prefix += 1
        self.stats.dense += 1
        key = reason.split(":")[0]
        self.stats.reasons[key] = self.stats.reasons.get(key, 0) + 1
        return PlanResult("dense", reason, prefix, slots, gates)

    @torch.inference_mode()
    def plan(self, req_id: str, ids: list, call: CallLayout) -> PlanResult:
        """The call's path. Reuse: its KV [0, T-1) is staged for the load step. Dense:
        what record() needs after the prefill is kept."""
        lay = PromptLayout(ids=list(ids), spans=[tuple(s) for s in call.spans],
                           segments=[tuple(s) for s in call.segments], s0=call.s0, problem=call.problem)
        T = lay.length
        agent = self.agents.get(call.agent_key)
        if agent is None:
            return self._dense(req_id, "agent template not registered on this worker", None, ids, {}, {})
        st = self.session(call.session, call.round)
        reason = lay.problem
        if reason is None and self.spec.exact_positions is not None and T + call.max_tokens > self.spec.exact_positions:
            reason = (f"prompt + reply longer than {self.spec.exact_positions} positions, where "
                      f"{self.spec.rope_type} RoPE key moves stop being exact")
        reason = reason or agent.alignment_problem(lay)
        slots: dict = {}
        if reason is not None:
            return self._dense(req_id, reason, agent, ids, slots, {})
        # Every slot's base first: a call that cannot have all of them decides nothing
        # (no anchor is added that this call could not record deltas into).
        found = []
        for name, a, b in lay.spans:
            decided, base = self._base(st, name, tuple(ids[a:b]))
            if decided is None and base is None:
                slots[name] = "no base KV (content not encoded and no captured reply)"
                return self._dense(req_id, f"slot {name}: no base KV", agent, ids, slots, {})
            found.append((name, tuple(ids[a:b]), decided, base))
        contents = []
        for name, cids, decided, base in found:
            if decided is None:
                decided = self._decide(name, cids, base[0], base[1], base[2], call.learn)
                st.contents[(name, cids)] = decided
            contents.append(decided)
        gates = {c.slot: c.gate for c in contents}
        missing: set = set()
        reason = paths.path_reason(self.pool, agent.key, lay.spans, contents, slots, missing)
        if reason is None:
            k = torch.empty(self.spec.num_layers, self.spec.kv_heads, T - 1, self.spec.head_dim,
                            dtype=self.spec.dtype, device=self.spec.device)
            v = torch.empty_like(k)
            reason = paths.assemble(self.pool, agent, lay, contents, k, v, self.spec.inv_freq, slots)
            if reason is None:
                self.staged[req_id] = (k, v)
                self.stats.reuse += 1
                return PlanResult("reuse", "all slots shared" if contents else "no slots: exact prefix",
                                  T - 1, slots, gates)
        if call.learn:
            self.dense[req_id] = _DensePlan(agent, lay, contents, missing, slots)
        return self._dense(req_id, reason, agent, ids, slots, gates)

    # ------------------------------------------------------------------ after a dense prefill

    @torch.inference_mode()
    def record(self, req_id: str, k: torch.Tensor, v: torch.Tensor) -> bool:
        """The dense call's real KV k, v [L,H,>=T-1,D] (from position 0) -> deltas."""
        plan = self.dense.pop(req_id, None)
        if plan is None:
            return False
        paths.record_deltas(self.pool, plan.agent, plan.lay, plan.contents, plan.missing, plan.slots, k, v,
                            self.spec.inv_freq)
        self.stats.records += 1
        return True

    def s0(self, agent_key: str):
        a = self.agents.get(agent_key)
        return None if a is None else (a.s0_k, a.s0_v)

    def drop(self, req_id: str) -> None:
        self.staged.pop(req_id, None)
        self.dense.pop(req_id, None)
