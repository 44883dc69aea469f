"""KVCOMM's state on one vLLM worker: the planner, its agents and sessions, staged KV.

The connector's worker side reads KV out of vLLM's paged cache and writes KV into it
(paged.py); everything in between is the call planner's (kvcomm.plan), on plain
[layers, kv_heads, tokens, head_dim] tensors of this rank's heads:

- an agent's exact S0 and neutral template segments come from the template request's
  prefill (vLLM computed it; the front end sent the prompt rendered with the placeholder
  markers in place, as KVCommEngine.add_agent renders it);
- a content's base comes from an encode request's prefill (the content behind its
  kind's header) or from the sender's reply, read back from the sender's blocks;
- plan(): the planner's plan of the call, as a prefix-only backend (vLLM computes every
  prompt token after the KV the connector loads): reuse and partial calls get S0 and the
  estimated slots staged for the load step; dense calls load the exact S0; after the
  prefill, record() turns the KV vLLM computed for the call's slots into deltas.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field

import torch

from ..plan.decide import RankGroup, head_length, nearest_first, usable_anchors
from ..plan.planner import CallPlan, Planner, PlanSettings
from ..plan.state import AgentState, Prepared, Sessions, agent_from_template_kv, tensor_bytes
from ..plan.template import PromptLayout, parse_template
from .heap import HeapTrimmer
from .jobs import CallLayout, PlanResult
from .memory_report import MemoryLog

log = logging.getLogger("kvcomm.vllm")

_LATE_PLANS = 64   # per session: plans kept waiting for a first-carried content's base
_PREPARE_WAIT_S = 2.0   # the longest a call waits for a content's preparation (then it decides itself)
_PREPARED_SETS = 2   # anchor weights prepared per content: one pass over the anchors' bases each


@dataclass
class WorkerStats:
    reuse: int = 0
    partial: int = 0
    dense: int = 0
    templates: int = 0
    encodings: int = 0
    captures: int = 0
    records: int = 0
    reasons: dict = field(default_factory=dict)


class WorkerState:
    """spec: kvcomm.hf.ModelSpec of this rank (kv_heads = the heads it holds); settings: how
    calls decide (prefix_only is forced: that is what vLLM's connector interface allows)."""

    def __init__(self, spec, pool, group: RankGroup | None = None, max_sessions: int = 1024,
                 settings: PlanSettings | None = None, max_templates: int = 4096,
                 session_bytes: int = 1 << 30, template_bytes: int = 256 << 20):
        settings = settings or PlanSettings()
        if not settings.prefix_only:
            settings = dataclasses.replace(settings, prefix_only=True)
        self.spec = spec
        self.planner = Planner(pool, spec, settings, group=group)
        self.agents: OrderedDict[str, AgentState] = OrderedDict()   # template key -> agent state
        self.max_templates = int(max_templates)
        self.template_bytes = int(template_bytes)
        self._agent_bytes: dict[str, int] = {}
        self.sessions = Sessions(max_sessions, session_bytes)
        self.staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: dict[str, tuple] = {}   # req_id -> (plan, session): computed KV recorded after the prefill
        self.stats = WorkerStats()
        self._recorder: ThreadPoolExecutor | None = None
        self._preparer: ThreadPoolExecutor | None = None
        self._preparing: dict[tuple, Future] = {}   # (session id, slot, ids) -> a preparation in flight
        self.heap = HeapTrimmer()   # transient buffers' pages go back to the system after the work
        self.memory_log = MemoryLog()   # $KVCOMM_MEMORY_LOG: what is held, by part, after each trim

    @property
    def pool(self):
        return self.planner.pool

    def session(self, sid: str, rnd: int = 0):
        return self.sessions.get(sid, rnd)

    # ------------------------------------------------------------------ saves (KV read back)

    def add_template(self, key: str, name: str, system: str, template_text: str, lay: PromptLayout,
                     k: torch.Tensor, v: torch.Tensor, pool_key: str | None = None) -> None:
        """The agent's S0 and segment KV from the marker render's prefill (k, v [L,H,>=T-1,D]),
        kept under the template's key; deltas go under pool_key (default: the same)."""
        if key in self.agents:
            self.agents.move_to_end(key)
            return
        state = agent_from_template_kv(name, pool_key or key, system, parse_template(template_text), lay, k, v,
                                       self.spec.inv_freq, template_key=key)
        self.agents[key] = state
        self._agent_bytes[key] = tensor_bytes(state.s0_k, state.s0_v, state.seg_k, state.seg_v)
        while len(self.agents) > 1 and (len(self.agents) > self.max_templates
                                        or sum(self._agent_bytes.values()) > self.template_bytes):
            old, _ = self.agents.popitem(last=False)   # least recently used template shapes go
            self._agent_bytes.pop(old, None)
        self.stats.templates += 1

    def add_encoding(self, sid: str, kind: str, ids: tuple, k: torch.Tensor, v: torch.Tensor, start: int,
                     slot: str | None = None) -> None:
        """A content encoded behind its header: k, v [L,H,n,D] of its tokens, the first at `start`;
        `slot`: the slot a call will read it in (its estimate's weights are prepared for it)."""
        from ..plan.neutral import neutral_keys
        st = self.session(sid)
        key = (kind, tuple(ids))
        if key not in st.encoded:   # kept for the session: copies only of a view into a larger buffer
            own = v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()
            st.encoded[key] = (neutral_keys(k, start, self.spec.inv_freq), v if own else v.contiguous().clone())
        self.stats.encodings += 1
        group = self.planner.group
        if slot and self.planner.estimator.uses_anchors and (group is None or group.world_size == 1):
            # On a thread of its own, at once (the record thread may be busy): a call or the
            # first carrier's settle (below) that decides this content meanwhile waits for it
            # rather than doing the same passes over the anchors beside it.
            if self._preparer is None:
                self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcomm-prepare")
            where = (id(st), slot, key[1])
            fut = self._preparing[where] = self._preparer.submit(self._prepare_weights, st, slot, key)
            fut.add_done_callback(lambda f, where=where: self._preparing.get(where) is f and self._preparing.pop(where))
        if st.late_plans:
            self._background(self._settle, st)

    @torch.inference_mode()
    def _prepare_weights(self, st, slot: str, key: tuple) -> None:
        """An encoded content's distances to its slot's candidates and its estimate's anchor
        weights, computed after its encoding lands (the first carrier's call is decoding
        meanwhile) instead of on the next call's critical path: whatever decides the content
        first (the first carrier's settle or the next call, which wait for this) takes the
        distances while the slot's candidates are the same anchors, and an agent's first
        estimate takes the weights over its anchors (prepared for each set of anchors the
        agents use, _anchor_sets; kvcomm.AnchorPool.estimate_weights) while they are still
        the ones it chooses; else they are computed again. A content too long for its slot's
        pool is prepared as decide_content decides it, on its covered head; weights only for
        a content (or head) that shares. Under tensor
        parallelism the decision needs every rank's distances, so it waits for the call there."""
        ids = key[1]
        if (slot, ids) in st.contents or key not in st.encoded:
            return   # decided already (its call computed the weights), or forgotten
        try:
            t0 = time.perf_counter()
            k, v = st.encoded[key]
            rms = self.pool.config.distance == "rms"
            cand, dist = self.pool.candidate_distances(slot, v, rms=rms)
            prep, tokens, near = Prepared(tuple(int(i) for i in cand), dist), None, ()
            d = self.pool.decide_from_distances(slot, cand, dist, credit=False)
            if d.share:
                tokens, near = len(ids), nearest_first(cand, dist)
            elif d.reason == "too_few_candidates":   # decided on its covered head, if any (decide_content)
                m = head_length(self.pool, slot, ids, self.planner.head_share)
                if m is not None:
                    hc, hd = self.pool.candidate_distances(slot, v[:, :, :m], rms=rms)
                    prep.head = (m, tuple(int(i) for i in hc), hd)
                    if self.pool.decide_from_distances(slot, hc, hd, credit=False).share:
                        tokens, near = m, nearest_first(hc, hd)
            weights = []
            if tokens:   # a content that is not estimated needs no weights
                carried = {p.agent.key for p in st.late_plans}   # computed it in context: they do not estimate it
                for used in self._anchor_sets(slot, tokens, near, carried):
                    # the pool's own choice over exactly these anchors: they rank first, `limit` of them
                    w = self.pool.estimate_weights(slot, k[:, :, :tokens], v[:, :, :tokens], list(used), len(used))
                    if w is not None:
                        weights.append(w)
            prep.weights = tuple(weights)
            if (slot, ids) not in st.contents:   # a call may have decided it meanwhile
                st.prepared[(slot, ids)] = prep
            log.debug("kvcomm connector: prepared a %d-token %s content in %.1f ms (%d candidates, weights over "
                      "%s tokens for %d anchor sets)%s", len(ids), slot, (time.perf_counter() - t0) * 1000.0,
                      len(cand), tokens, len(weights), "" if (slot, ids) in st.prepared else "; decided meanwhile")
        except Exception:
            log.exception("kvcomm connector: preparing the weights of a %s content failed", slot)

    def _anchor_sets(self, slot: str, tokens: int, nearest: tuple, skip=()) -> list[tuple]:
        """The distinct sets of anchors the agents holding deltas in `slot` (but those in
        `skip`) would estimate a content of `tokens` tokens over, those more agents use
        first, at most _PREPARED_SETS (agents hold deltas of different anchors when they read
        the slot in different graphs, or shared a content's head where others computed it)."""
        infos = self.pool.anchors(slot)
        limit = self.planner.settings.estimate_anchors
        count: dict[tuple, int] = {}
        agents = {a for info in infos if info.length >= tokens for a in info.agents} - set(skip)
        for agent_key in sorted(agents):
            used = usable_anchors(infos, tokens, agent_key, nearest, limit)
            if used:
                count[used] = count.get(used, 0) + 1
        return sorted(count, key=lambda u: -count[u])[:_PREPARED_SETS]

    def add_reply(self, call: CallLayout, ids: tuple, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """A call's reply tokens that carry KV (k, v [L,H,n,D], the first at `start`): the base
        of {agent_<name>_current}, decided against that slot's pool now."""
        st = self.session(call.session, call.round)
        self.planner.capture(st, call.agent_name, ids, k, v, start, learn=call.learn)
        self.stats.captures += 1

    # ------------------------------------------------------------------ planning

    @torch.inference_mode()
    def plan(self, req_id: str, ids: list, call: CallLayout, cached: int = 0) -> PlanResult:
        """The call's path. Reuse / partial: its KV [0, prefix) is staged for the load step.
        Dense: the exact S0 is loaded. Either way what record() needs after the prefill is kept.
        cached: tokens vLLM's prefix cache holds (slots before it are used as cached)."""
        lay = PromptLayout(ids=list(ids), spans=[tuple(s) for s in call.spans],
                           segments=[tuple(s) for s in call.segments], s0=call.s0, problem=call.problem,
                           merged=list(call.merged))
        agent = self.agents.get(call.agent_key)
        if agent is not None:
            self.agents.move_to_end(call.agent_key)
        if agent is None:
            return self._count(PlanResult("dense", "agent template not registered on this worker", 0))
        st = self.session(call.session, call.round)
        t0 = time.perf_counter()
        self._await_preparing(st, [(name, tuple(lay.ids[a:b])) for name, a, b in lay.spans])
        plan = self.planner.plan(agent, lay, st, max_new_tokens=call.max_tokens, learn=call.learn,
                                 deferred=frozenset(call.deferred), cached=cached)
        t1 = time.perf_counter()
        if plan.uses_estimates:
            T = lay.length
            k = torch.empty(self.spec.num_layers, self.spec.kv_heads, T - 1, self.spec.head_dim,
                            dtype=self.spec.dtype, device=self.spec.device)
            v = torch.empty_like(k)
            self.planner.assemble(plan, k, v)
            if plan.uses_estimates:
                self.staged[req_id] = (k, v)
        log.debug("kvcomm connector: %s planned %s in %.1f ms, estimated in %.1f ms", req_id, plan.path,
                  (t1 - t0) * 1000.0, (time.perf_counter() - t1) * 1000.0)
        record = plan.learn and plan.refused is None and plan.path != "reuse"
        if record:
            self.pending[req_id] = (plan, st)
        return self._count(PlanResult(plan.path, plan.reason, plan.prefix, dict(plan.decisions), plan.gates,
                                      record=record, pool_anchors=self.pool.size(),
                                      pool_bytes=self.pool.memory_bytes()))

    def _count(self, res: PlanResult) -> PlanResult:
        setattr(self.stats, res.path, getattr(self.stats, res.path) + 1)
        if res.path != "reuse":
            key = res.reason.split(":")[0]
            self.stats.reasons[key] = self.stats.reasons.get(key, 0) + 1
        return res

    # ------------------------------------------------------------------ after the prefill

    @torch.inference_mode()
    def record(self, req_id: str, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> bool:
        """The call's KV k, v [L,H,n,D] after its prefill (index 0 holds prompt position
        `offset`, at most record_start(req_id)) -> deltas of the slots vLLM computed."""
        item = self.pending.pop(req_id, None)
        if item is None:
            return False
        self._record_plan(*item, k, v, offset)
        return True

    def record_start(self, req_id: str) -> int | None:
        """The first prompt position the call's record reads (its KV before it need not be
        read back); None when there is nothing to record (the call is then forgotten)."""
        item = self.pending.get(req_id)
        start = None if item is None else self.planner.record_start(item[0])
        if start is None:
            self.pending.pop(req_id, None)
        return start

    def record_later(self, req_id: str, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> None:
        """record() on a background thread: the step that read the KV back (and the call's
        first token with it) does not wait for the delta arithmetic. k, v are the worker's
        own copies."""
        item = self.pending.pop(req_id, None)
        if item is not None:
            self._background(self._record_plan, *item, k, v, offset)

    def trim_heap_later(self) -> None:
        """A heap trim on the background thread when one is due: a trim walks every heap,
        which the engine's step need not wait for."""
        if self.heap.due():
            self._background(self._trim)

    def _trim(self) -> None:
        if self.heap.maybe_trim():
            self.memory_log.write(self)

    def _background(self, fn, *args) -> None:
        """One background thread for the pool's writes after a step: in order, off the step."""
        if self._recorder is None:
            self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcomm-record")
        self._recorder.submit(fn, *args)

    @torch.inference_mode()
    def _record_plan(self, plan: CallPlan, st, k, v, offset: int = 0) -> None:
        try:
            self.planner.record(plan, k, v, offset)
            self.stats.records += 1
            if plan.late:   # slots this call carried first: their deltas once their base is there
                self._await_preparing(st)
                self.planner.settle(plan, st)
                if plan.late:
                    st.late_plans = (st.late_plans + [plan])[-_LATE_PLANS:]
        except Exception:
            log.exception("kvcomm connector: recording deltas failed")
        finally:
            self._trim()   # what earlier work freed (these copies go once this returns)

    def _await_preparing(self, st, contents=None) -> None:
        """Waits for the preparations in flight of these (slot, ids) contents of session `st`
        (None: all of its), at most _PREPARE_WAIT_S."""
        keys = [w for w in list(self._preparing) if w[0] == id(st)] if contents is None else \
            [(id(st), slot, ids) for slot, ids in contents]
        futs = [f for f in (self._preparing.get(w) for w in keys) if f is not None]
        if futs:
            futures_wait(futs, timeout=_PREPARE_WAIT_S)

    @torch.inference_mode()
    def _settle(self, st) -> None:
        try:
            self._await_preparing(st)
            for plan in list(st.late_plans):
                self.planner.settle(plan, st)
            st.late_plans = [p for p in st.late_plans if p.late]
        except Exception:
            log.exception("kvcomm connector: recording a first carrier's deltas failed")

    def flush(self) -> None:
        """Waits for the background records (before the pool is saved for good)."""
        if self._preparer is not None:
            self._preparer.shutdown(wait=True)
            self._preparer = None
        if self._recorder is not None:
            self._recorder.shutdown(wait=True)
            self._recorder = None

    def s0(self, agent_key: str):
        a = self.agents.get(agent_key)
        return None if a is None else (a.s0_k, a.s0_v)

    def drop(self, req_id: str) -> None:
        self.staged.pop(req_id, None)
        self.pending.pop(req_id, None)
