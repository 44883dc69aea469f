"""KVCommConnector: KVCOMM as a vLLM V1 KV connector.

Load it with
    --kv-transfer-config '{"kv_connector": "KVCommConnector",
                           "kv_connector_module_path": "kvcomm.vllm.connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"server_token": "..."}}'
(`kvcomm serve` and kvcomm.vllm.launch build this, with the front end that fills in the
per-call layout). vLLM runs one instance in the scheduler (engine-core process) and
one in every worker.

One agent call, step by step (an engine step = one schedule + one model execution):
1. scheduler, get_num_new_matched_tokens: the call's path is not known yet, so it
   answers "ask again" (None) and puts a plan job into this step's metadata;
2. worker, end of that step: decides every slot (the pool's share-or-anchor decision,
   reduced over tensor-parallel ranks) and, when every slot can be estimated, assembles
   S0 + estimates into a staging buffer; the answer (reuse / dense and why) goes back
   in the step's worker metadata;
3. scheduler, next step: reuse -> "T-1 tokens are external" (vLLM computes only the
   last prompt token); dense -> "the exact S0 prefix is external" (vLLM prefills the
   rest for real). The choice is the scheduler's, made on the worker's answer, so
   nothing estimated is ever used where the worker could not estimate;
4. worker, that step: writes the staged KV (or S0) into the call's blocks with vLLM's
   own cache-write op before the forward;
5. dense calls: when the prefill completes, the worker reads the real KV back and
   records deltas into the anchors (docs/method.md §6);
6. scheduler, request_finished: the reply's KV (generated tokens that were fed back)
   is read from the blocks before they are freed, as the base of
   {agent_<name>_current}; the response's kv_transfer_params say which path ran.
If a load fails anyway (a bug, a missing staging buffer), the worker reports the blocks
and vLLM recomputes them (kv_load_failure_policy "recompute"): a failure costs time,
never correctness. Requests without KVCOMM parameters are not touched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from .jobs import CallLayout, CaptureJob, KVCommMeta, KVCommWorkerMeta, LoadJob, PlanJob, PlanResult, SaveJob
from .protocol import KEY, SERVER, ids_digest, reply_span

log = logging.getLogger("kvcomm.vllm")

# Extra-config keys (kv_connector_extra_config)
TOKEN = "server_token"        # shared with the front end; internal fields need it
POOL_FILE = "pool_file"       # optional: an AnchorPool file loaded at start (warm pool)
POOL_ARGS = "pool"            # optional: kvcomm.PoolConfig keyword arguments
MAX_SESSIONS = "max_sessions"
KEEP_LOADS = "keep_loads"     # diagnostics: read back what each load wrote (worker_state.kept)


@dataclass
class _Req:
    kind: str                 # "call", "template" or "encode"
    request: Any              # vllm.v1.request.Request
    params: dict              # the _server fields
    call: CallLayout | None = None
    plan: PlanResult | None = None
    plan_sent: bool = False
    local: int = 0            # locally cached tokens when the load was decided
    load: tuple | None = None
    saved: bool = False


class KVCommConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._token = extra.get(TOKEN)
        if not self._token:
            log.warning("kvcomm connector: no %r in kv_connector_extra_config; every request is served as "
                        "plain vLLM (start the server with `kvcomm serve`)", TOKEN)
        self._extra = extra
        if role == KVConnectorRole.SCHEDULER:
            self._sched_init(vllm_config)
        else:
            self._worker_init(vllm_config)

    # ================================================================== scheduler side

    def _sched_init(self, vllm_config) -> None:
        self._reqs: dict[str, _Req] = {}
        self._plan_queue: list[str] = []
        self._captures: list[CaptureJob] = []
        self._drops: list[str] = []
        self._prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        self._tokenizer_path = vllm_config.model_config.tokenizer
        self._blank: dict[int, bool] = {}
        self._tok = None
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
        if op in ("template", "encode"):
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
            info = _Req("call", request, srv, call=CallLayout(
                agent_key=srv["agent_key"], agent_name=srv["agent"], session=srv["session"], round=srv["round"],
                learn=bool(srv.get("learn", True)), spans=[tuple(s) for s in srv["spans"]],
                segments=[tuple(s) for s in srv["segments"]], s0=srv["s0"], problem=srv.get("problem"),
                max_tokens=int(sp.max_tokens or 0) if sp is not None else 0))
        else:
            return None
        self._reqs[request.request_id] = info
        return info

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        info = self._parse(request)
        if info is None or info.kind != "call":
            return 0, False
        if info.plan is None:
            if not info.plan_sent:
                self._plan_queue.append(request.request_id)
                info.plan_sent = True
            return None, False   # asked again once the worker has planned
        info.local = num_computed_tokens
        return max(0, info.plan.prefix - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        info = self._reqs.get(request.request_id)
        if info is not None and num_external_tokens > 0:
            info.load = (info.local, info.local + num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVCommMeta:
        meta = KVCommMeta()
        for req_id in self._plan_queue:
            info = self._reqs.get(req_id)
            if info is not None:
                meta.plans.append(PlanJob(req_id, list(info.request.prompt_token_ids), info.call))
        self._plan_queue = []
        state = scheduler_output.kv_connector_block_state
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            info = self._reqs.get(req_id)
            if info is None:
                continue
            if info.load is not None:
                a, b = info.load
                meta.loads.append(LoadJob(req_id, list(state.get_block_ids(req_id)[0]), a, b))
                info.load = None
            wants_save = info.kind != "call" or (info.plan is not None and info.plan.path == "dense"
                                                 and info.call.learn)
            prompt_len = info.request.num_prompt_tokens
            if wants_save and not info.saved and info.request.num_computed_tokens + n_sched >= prompt_len:
                meta.saves.append(SaveJob(req_id, "record" if info.kind == "call" else info.kind,
                                          list(state.get_block_ids(req_id)[0]), prompt_len, info.params))
                info.saved = True
        meta.captures, self._captures = self._captures, []
        meta.drops, self._drops = self._drops, []
        return meta

    def update_connector_output(self, connector_output) -> None:
        wm = connector_output.kv_connector_worker_meta
        if isinstance(wm, KVCommWorkerMeta):
            for req_id, res in wm.plans.items():
                info = self._reqs.get(req_id)
                if info is not None:
                    info.plan = res

    def _is_blank(self, token_id: int) -> bool:
        b = self._blank.get(token_id)
        if b is None:
            if self._tok is None:
                from transformers import AutoTokenizer
                self._tok = AutoTokenizer.from_pretrained(self._tokenizer_path, local_files_only=True)
            b = self._blank[token_id] = self._tok.decode([token_id]).strip() == ""
        return b

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        info = self._reqs.pop(request.request_id, None)
        if info is None:
            return False, None
        self._drops.append(request.request_id)
        if info.kind != "call":
            return False, {KEY: {"op": info.kind, "saved": info.saved}}
        plan = info.plan
        out = {"path": plan.path if plan else "none", "reason": plan.reason if plan else "finished before planning",
               "slots": plan.slots if plan else {}, "prompt_tokens": request.num_prompt_tokens}
        delay = False
        from vllm.v1.request import RequestStatus
        ids = list(request.output_token_ids)
        stops = set(request.sampling_params.all_stop_token_ids) if request.sampling_params else set()
        lo, hi, fed = reply_span(ids, stops, self._is_blank)
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

    # ================================================================== worker side

    def _worker_init(self, vllm_config) -> None:
        self._vllm_config = vllm_config
        self._paged = None
        self._state = None
        self._kv_caches: dict = {}
        self._load_errors: set[int] = set()
        self._sent: set[str] = set()
        self._results: dict[str, PlanResult] = {}
        self._calls: dict[str, CallLayout] = {}
        self.kept: dict[str, tuple] = {}   # req_id -> (K, V) read back after a load (KEEP_LOADS)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_caches = kv_caches

    def _ready(self):
        """PagedKV and WorkerState, built on first use (the attention layers get their
        CPU instruction path after the caches are registered)."""
        if self._state is not None:
            return self._paged, self._state
        from .. import AnchorPool, PoolConfig
        from .model_info import connector_spec
        from .paged import PagedKV
        from .tp import RankGroup
        from .worker_state import WorkerState
        cfg = self._vllm_config
        layers = cfg.compilation_config.static_forward_context
        paged = PagedKV(self._kv_caches, {n: layers.get(n) for n in self._kv_caches}, cfg.cache_config.cache_dtype)
        spec = connector_spec(cfg.model_config.hf_config, paged.num_layers, paged.kv_heads, paged.head_dim,
                              paged.dtype, paged.device)
        pool = AnchorPool(PoolConfig(**dict(self._extra.get(POOL_ARGS) or {}), layers=spec.num_layers,
                                     kv_heads=spec.kv_heads, head_dim=spec.head_dim))
        group = RankGroup.from_vllm()
        if self._extra.get(POOL_FILE):
            path = self._extra[POOL_FILE]
            if group.world_size > 1:
                from vllm.distributed import get_tensor_model_parallel_rank
                path = path.format(rank=get_tensor_model_parallel_rank())
            pool.load(path, str(paged.device) if paged.device.type != "cpu" else "")
        self._paged = paged
        self._state = WorkerState(spec, pool, group, max_sessions=int(self._extra.get(MAX_SESSIONS, 1024)))
        return self._paged, self._state

    @property
    def worker_state(self):
        """The worker's KVCOMM state (tests, diagnostics); None before the first step."""
        return self._state

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVCommMeta) or not meta.loads:
            return
        paged, state = self._ready()
        for job in meta.loads:
            try:
                staged = state.staged.get(job.req_id)
                if staged is not None:
                    k, v = staged
                else:
                    s0 = state.s0(self._plan_agent(job.req_id))
                    if s0 is None or s0[0] is None:
                        raise RuntimeError("no staged KV and no exact S0 for this call")
                    k, v = s0
                if job.stop > k.shape[2]:
                    raise RuntimeError(f"load of [{job.start}, {job.stop}) but only {k.shape[2]} tokens are staged")
                with torch.inference_mode():
                    paged.write(k[:, :, job.start:job.stop], v[:, :, job.start:job.stop],
                                paged.slot_mapping(job.block_ids, job.start, job.stop))
                    if self._extra.get(KEEP_LOADS):
                        self.kept[job.req_id] = paged.read(job.block_ids, job.start, job.stop)
            except Exception as e:  # recomputed by vLLM: slower, never wrong
                log.error("kvcomm connector: load of %s failed (%s); its blocks are recomputed", job.req_id, e)
                bs = paged.block_size
                self._load_errors.update(job.block_ids[job.start // bs:-(-job.stop // bs)])

    def _plan_agent(self, req_id: str) -> str | None:
        call = self._calls.get(req_id)
        return None if call is None else call.agent_key

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        # Everything is read back in wait_for_save, after the step's forward has written
        # every layer: one read per job instead of one per layer.
        return None

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVCommMeta) or not (meta.saves or meta.captures or meta.plans or meta.drops):
            return
        paged, state = self._ready()
        with torch.inference_mode():
            for job in meta.saves:
                try:
                    self._save(paged, state, job)
                except Exception as e:
                    log.error("kvcomm connector: saving %s (%s) failed: %s", job.req_id, job.kind, e)
            for job in meta.captures:
                try:
                    k, v = paged.read(job.block_ids, job.start, job.stop)
                    state.add_reply(job.call, tuple(job.ids), k, v, job.start)
                except Exception as e:
                    log.error("kvcomm connector: capturing the reply of %s failed: %s", job.req_id, e)
                finally:
                    self._sent.add(job.req_id)   # the blocks may be freed now, captured or not
            for job in meta.plans:
                try:
                    res = state.plan(job.req_id, job.ids, job.call)
                    self._calls[job.req_id] = job.call
                except Exception as e:
                    log.exception("kvcomm connector: planning %s failed", job.req_id)
                    state.drop(job.req_id)
                    res = PlanResult("dense", f"planning failed: {e}", 0)
                self._results[job.req_id] = res
            for req_id in meta.drops:
                state.drop(req_id)
                self._calls.pop(req_id, None)

    def _save(self, paged, state, job: SaveJob) -> None:
        from ..plan.template import PromptLayout
        p = job.params
        T = job.prompt_len
        if job.kind == "template":
            k, v = paged.read(job.block_ids, 0, T - 1)
            lay = PromptLayout(ids=list(p["ids_list"]), spans=[tuple(s) for s in p["spans"]],
                               segments=[tuple(s) for s in p["segments"]], s0=p["s0"], problem=p.get("problem"))
            state.add_template(p["agent_key"], p["agent"], p.get("system", ""), p["template"], lay, k, v)
        elif job.kind == "encode":
            h = int(p["header"])
            k, v = paged.read(job.block_ids, h, T)
            state.add_encoding(p["session"], p["kind"], tuple(p["content_ids"]), k, v, h)
        elif job.kind == "record":
            k, v = paged.read(job.block_ids, 0, T - 1)
            state.record(job.req_id, k, v)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sent, self._sent = self._sent, set()
        return (sent or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errs, self._load_errors = self._load_errors, set()
        return errs

    def build_connector_worker_meta(self):
        if not self._results:
            return None
        out, self._results = KVCommWorkerMeta(self._results), {}
        return out
