"""The scheduler half of KVCommConnector (runs in vLLM's engine-core process).

Per KVCOMM call it asks the worker side for a plan (one step), then tells vLLM how many
prompt tokens come from the connector (the plan's prefix), asks for loads and read-backs,
and when the request finishes, captures the reply's KV before its blocks are freed. It
imports no model code: the planner's records travel in kvcomm.vllm.jobs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..plan.replies import BlankTokens, reply_span
from .jobs import CallLayout, CaptureJob, KVCommMeta, KVCommWorkerMeta, LoadJob, PlanJob, PlanResult, SaveJob
from .protocol import KEY, OPS, SERVER, ids_digest
from .settings import TOKEN

log = logging.getLogger("kvcomm.vllm")

# A reuse plan estimates every prompt token but the last; the connector hands vLLM this many
# to compute instead of one. vLLM's CPU step for a one-token prefill over ~800 loaded tokens
# took 176-184 ms where a few tokens took 86-132 ms (bf16, the 3-agent server benchmark; the
# reuse-path calls 87-194 ms, bimodal, before; 86-118 ms with a tail of 8). The tail's KV is
# computed in context (exact), at the cost of a few tokens of prefill.
REUSE_TAIL = 8


def loaded_prefix(plan, prompt_tokens: int, tail: int = 0) -> int:
    """The prompt tokens the connector loads for `plan` (a PlanResult): its prefix, less the
    last tokens vLLM computes - a reuse call's REUSE_TAIL, or the call's own `tail` when
    longer (the front end gives inferred chat calls one: docs/serving.md). A dense plan's
    prefix is exact KV (the agent's S0) and is loaded whole."""
    if plan.path == "dense":
        return plan.prefix
    keep = max(int(tail or 0), REUSE_TAIL if plan.path == "reuse" else 0)
    return min(plan.prefix, max(0, prompt_tokens - keep))


@dataclass
class _Req:
    kind: str                 # "call", "template" or "encode"
    request: Any              # vllm.v1.request.Request
    params: dict              # the _server fields
    call: CallLayout | None = None
    plan: PlanResult | None = None
    plan_sent: bool = False
    local: int = 0            # locally cached tokens when the load was decided
    cached: int | None = None  # locally cached tokens when the scheduler first asked (the plan's)
    evicted: bool = False     # fewer cached tokens by the load than the plan counted on
    load: tuple | None = None
    saved: bool = False
    early: bool = False       # the front end decided the path: the worker plans it with the record
    due: tuple | None = None  # (block ids, preemptions) of a completed prefill whose record waits a step

    def loaded(self) -> int:
        """Prompt tokens the connector loads for this call's plan (loaded_prefix)."""
        return loaded_prefix(self.plan, self.request.num_prompt_tokens, self.params.get("tail", 0))


class SchedulerSide:
    def __init__(self, vllm_config, extra: dict):
        self._token = extra.get(TOKEN)
        self._reqs: dict[str, _Req] = {}
        self._plan_queue: list[str] = []
        self._captures: list[CaptureJob] = []
        self._due: list[str] = []          # calls whose prefill completed in the last step
        self._late: KVCommMeta = KVCommMeta()   # due work of calls that finished in that step
        self._drops: list[str] = []
        self._prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        self._tokenizer_path = vllm_config.model_config.tokenizer
        self._is_blank = None
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _parse(self, request) -> _Req | None:
        """The request's KVCOMM role, or None for a plain request (never an exception:
        the front end has validated the client's part; anything else is served plain)."""
        info = self._reqs.get(request.request_id)
        if info is not None:
            return info
        ktp = request.kv_transfer_params
        p = ktp.get(KEY) if isinstance(ktp, dict) else None
        if not isinstance(p, dict):
            return None
        srv = p.get(SERVER)
        if not self._token or not isinstance(srv, dict) or srv.get("token") != self._token:
            self._warn_once("front", "kvcomm connector: a request with kvcomm parameters but without the front "
                            "end's fields is served as plain vLLM (send calls through `kvcomm serve`)")
            return None
        op = srv.get("op", "call")
        if op in OPS:
            info = _Req(op, request, srv)
        elif op == "call":
            ids = request.prompt_token_ids or []
            if srv.get("ids") != ids_digest(ids) or srv.get("n") != len(ids):
                self._warn_once("ids", "kvcomm connector: the engine's prompt tokens differ from the front end's "
                                "layout (another chat template?); such calls are served as plain vLLM")
                return None
            if self._prefix_caching and not request.cache_salt:
                # Estimated KV must never become a prefix-cache hit of another request.
                self._warn_once("salt", "kvcomm connector: a call without cache_salt is served as plain vLLM")
                return None
            sp = request.sampling_params
            early = srv.get("dense_prefix")
            info = _Req("call", request, srv, call=CallLayout(
                agent_key=srv["agent_key"], agent_name=srv["agent"], session=srv["session"], round=srv["round"],
                learn=bool(srv.get("learn", True)), spans=[tuple(s) for s in srv["spans"]],
                segments=[tuple(s) for s in srv["segments"]], s0=srv["s0"], problem=srv.get("problem"),
                max_tokens=int(sp.max_tokens or 0) if sp is not None else 0, merged=list(srv.get("merged", [])),
                deferred=list(srv.get("deferred", []))))
            if isinstance(early, int) and early >= 0:
                # The front end knows the call is dense from its exact prefix on (it carries its
                # first content first): loaded now; the worker still plans it, for its records.
                info.plan = PlanResult("dense", srv.get("dense_reason") or "first slot carried first: computed in "
                                       "context", early, record=info.call.learn)
                info.plan_sent = info.early = True
        else:
            return None
        self._reqs[request.request_id] = info
        return info

    def forget(self, req_id: str) -> None:
        """Serve this request as plain vLLM from now on (a failure of the connector's own)."""
        if self._reqs.pop(req_id, None) is not None:
            self._drops.append(req_id)   # whatever the workers hold for it is freed

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        info = self._parse(request)
        if info is None or info.kind != "call":
            return 0, False
        if info.cached is None:
            # vLLM's own prefix-cache hits (the same tenant's earlier requests: the agent's
            # previous turn) are used as they are; the plan works on what follows
            info.cached = num_computed_tokens
        if info.plan is None:
            if not info.plan_sent:
                self._plan_queue.append(request.request_id)
                info.plan_sent = True
            return None, False   # asked again once the worker has planned
        info.local = num_computed_tokens
        if num_computed_tokens < info.cached:
            # blocks the plan took as cached were evicted meanwhile: its staged KV has no
            # estimate there, so vLLM computes everything after what it still holds
            info.evicted = True
            return 0, False
        return max(0, info.loaded() - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        info = self._reqs.get(request.request_id)
        if info is not None and num_external_tokens > 0:
            info.load = (info.local, info.local + num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVCommMeta:
        meta = KVCommMeta()
        self._send_due(meta)
        for req_id in self._plan_queue:
            info = self._reqs.get(req_id)
            if info is not None:
                meta.plans.append(PlanJob(req_id, list(info.request.prompt_token_ids), info.call, info.cached or 0))
        self._plan_queue = []
        state = scheduler_output.kv_connector_block_state
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            info = self._reqs.get(req_id)
            if info is None:
                continue
            if info.load is not None:
                a, b = info.load
                meta.loads.append(LoadJob(req_id, list(state.get_block_ids(req_id)[0]), a, b, info.call.agent_key))
                info.load = None
            wants_save = info.kind != "call" or (info.plan is not None and info.plan.record)
            prompt_len = info.request.num_prompt_tokens
            if (wants_save or info.early) and not info.saved and info.request.num_computed_tokens + n_sched >= prompt_len:
                blocks = list(state.get_block_ids(req_id)[0])
                if info.kind == "call":
                    # A call's record (and the plan the front end made for it) waits one step:
                    # the read-back of every prompt token would otherwise delay its first token.
                    info.due = (blocks, getattr(info.request, "num_preemptions", 0))
                    self._due.append(req_id)
                else:
                    meta.saves.append(SaveJob(req_id, info.kind, blocks, prompt_len, info.params))
                info.saved = True
        meta.captures, self._captures = self._captures, []
        meta.drops, self._drops = self._drops, []
        return meta

    def _due_jobs(self, meta: KVCommMeta, req_id: str, info: _Req, blocks: list, release: bool) -> None:
        """The deferred work of a call whose prefill is complete: the worker's plan of a call the
        front end decided (its records and report), then the read-back of its computed KV.
        release: the call has finished; the worker frees its blocks once they are read."""
        info.due = None
        if info.early:
            info.early = False
            meta.plans.append(PlanJob(req_id, list(info.request.prompt_token_ids), info.call, info.cached or 0))
        if info.plan is not None and info.plan.record:
            meta.saves.append(SaveJob(req_id, "record", blocks, info.request.num_prompt_tokens, info.params,
                                      release=release))

    def _send_due(self, meta: KVCommMeta) -> None:
        for req_id in self._due:
            info = self._reqs.get(req_id)
            if info is None or info.due is None:   # finished meanwhile: request_finished queued it
                continue
            blocks, preemptions = info.due
            if (getattr(info.request, "num_preemptions", 0) != preemptions
                    or info.request.num_computed_tokens < info.request.num_prompt_tokens):
                info.due, info.saved = None, False   # preempted: recorded once its prefill runs again
                continue
            self._due_jobs(meta, req_id, info, blocks, release=False)
        self._due = []
        late, self._late = self._late, KVCommMeta()
        meta.plans.extend(late.plans)
        meta.saves.extend(late.saves)

    def update_connector_output(self, connector_output) -> None:
        wm = connector_output.kv_connector_worker_meta
        if isinstance(wm, KVCommWorkerMeta):
            for req_id, res in wm.plans.items():
                info = self._reqs.get(req_id)
                if info is not None:
                    if info.plan is not None and not res.slots:
                        # dense as the front end said (its reason) and the worker decided
                        # nothing (the agent's template pass runs after this call)
                        res.reason = f"{info.plan.reason} ({res.reason})"
                    info.plan = res

    def _blank(self, token_id: int) -> bool:
        if self._is_blank is None:   # the tokenizer only when a reply first needs it
            from transformers import AutoTokenizer
            self._is_blank = BlankTokens(AutoTokenizer.from_pretrained(self._tokenizer_path, local_files_only=True))
        return self._is_blank(token_id)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        info = self._reqs.pop(request.request_id, None)
        if info is None:
            return False, None
        self._drops.append(request.request_id)
        if info.kind != "call":
            return False, {KEY: {"op": info.kind, "saved": info.saved}}
        plan = info.plan
        reason = plan.reason if plan else "finished before planning"
        if info.evicted:
            reason += "; computed after vLLM's prefix cache: blocks the plan counted on were evicted"
        out = {"path": "dense" if info.evicted else plan.path if plan else "none", "reason": reason,
               "slots": plan.slots if plan else {}, "prompt_tokens": request.num_prompt_tokens,
               "reused_tokens": max(info.loaded() if plan and not info.evicted else 0,
                                    info.local),
               "cached_tokens": info.local, "s0_tokens": int(info.params.get("s0", 0)),
               "agent": info.call.agent_name, "session": info.call.session,
               "pool_anchors": plan.pool_anchors if plan else None, "pool_bytes": plan.pool_bytes if plan else None}
        delay = False
        if info.due is not None:   # its first token was its last: its record still needs its blocks
            n_saves = len(self._late.saves)
            self._due_jobs(self._late, request.request_id, info, list(block_ids), release=True)
            delay = len(self._late.saves) > n_saves
        from vllm.v1.request import RequestStatus
        ids = list(request.output_token_ids)
        stops = set(request.sampling_params.all_stop_token_ids) if request.sampling_params else set()
        # A streamed call was given one token more than its client sees (reply_limit: the
        # front end's kvcomm.vllm.reply_trim): the reply is the client's tokens, all fed.
        limit = info.params.get("reply_limit")
        shown = ids[:limit] if isinstance(limit, int) and 0 < limit < len(ids) else ids
        lo, hi, fed = reply_span(shown, stops, self._blank, generated=len(ids))
        T = request.num_prompt_tokens
        normal = request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        # Generated tokens carry KV once fed back: all but the last one. A reply whose last
        # content token was never fed (cut by max_tokens) is not captured; the next agent
        # then encodes it behind the reply header instead.
        if plan is not None and normal and fed and T + hi <= request.num_computed_tokens:
            self._captures.append(CaptureJob(request.request_id, list(block_ids), T + lo, T + hi, ids[lo:hi],
                                             info.call))
            delay = True
            out["reply_ids"] = ids[lo:hi]
        else:
            out["reply_ids"] = None
        return delay, {KEY: out}
