"""The worker half of KVCommConnector (runs in every vLLM worker, one per tensor-parallel rank).

At the end of each engine step (wait_for_save) it reads back the KV the step's forward wrote
for template passes and header encodings, the KV of calls whose prefill completed in the step
before (a call's record waits a step so that its first token does not) and captured replies,
then plans the calls the scheduler asked about (kvcomm.vllm.worker_state: the planner on this rank's
heads). Before a step's forward (start_load_kv) it writes the planned KV into the calls'
blocks with vLLM's own cache-write op (kvcomm.vllm.paged). A load that fails reports its
blocks, and vLLM recomputes them: a failure costs time, never correctness.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .jobs import KVCommMeta, KVCommWorkerMeta, PlanResult, SaveJob
from .settings import (KEEP_LOADS, MAX_SESSIONS, POOL_FILE, POOL_NEW, SAVE_EVERY_ANCHORS, SAVE_EVERY_S,
                       SESSION_BYTES, TEMPLATE_BYTES, plan_settings, pool_args)

log = logging.getLogger("kvcomm.vllm")


class WorkerSide:
    """get_metadata: the connector's _get_connector_metadata (this step's KVCommMeta)."""

    def __init__(self, vllm_config, extra: dict, get_metadata):
        from .observe import setup_logging
        setup_logging()
        self._vllm_config = vllm_config
        self._extra = extra
        self._meta = get_metadata
        self.settings = plan_settings(extra)   # a bad setting fails the worker at start
        self._paged = None
        self._state = None
        self.store = None    # kvcomm.vllm.pool_store.PoolStore
        self._kv_caches: dict = {}
        self._load_errors: set[int] = set()
        self._sent: set[str] = set()
        self._results: dict[str, PlanResult] = {}
        self.kept: dict[str, tuple] = {}   # req_id -> (K, V) read back after a load (KEEP_LOADS)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        """The worker's caches are known: KVCOMM's state is built now, so a pool file that
        cannot be used stops the server before it takes traffic."""
        self._kv_caches = kv_caches
        self._build()

    def _build(self) -> None:
        from .. import AnchorPool, PoolConfig
        from .model_info import connector_spec
        from .paged import PagedKV
        from .pool_store import PoolStore
        from .tp import vllm_rank_group
        from .worker_state import WorkerState
        cfg = self._vllm_config
        layers = cfg.compilation_config.static_forward_context
        paged = PagedKV(self._kv_caches, {n: layers.get(n) for n in self._kv_caches}, cfg.cache_config.cache_dtype)
        spec = connector_spec(cfg.model_config.hf_config, paged.num_layers, paged.kv_heads, paged.head_dim,
                              paged.dtype, paged.device)
        pool = AnchorPool(PoolConfig(**pool_args(self._extra), layers=spec.num_layers, kv_heads=spec.kv_heads,
                                     head_dim=spec.head_dim))
        group = vllm_rank_group()
        path = self._extra.get(POOL_FILE)
        if path and group.world_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank
            path = path.format(rank=get_tensor_model_parallel_rank())
        self.store = PoolStore(pool, path or None, str(spec.dtype).replace("torch.", ""),
                               new_ok=bool(self._extra.get(POOL_NEW)),
                               every_s=float(self._extra.get(SAVE_EVERY_S, 600)),
                               every_anchors=int(self._extra.get(SAVE_EVERY_ANCHORS, 50)),
                               device=str(paged.device) if paged.device.type != "cpu" else "")
        self._paged = paged
        log.debug("kvcomm connector: worker state built (%d torch threads for KVCOMM's ops)", torch.get_num_threads())
        self._state = WorkerState(spec, pool, group, max_sessions=int(self._extra.get(MAX_SESSIONS, 1024)),
                                  settings=self.settings,
                                  session_bytes=int(self._extra.get(SESSION_BYTES, 1 << 30)),
                                  template_bytes=int(self._extra.get(TEMPLATE_BYTES, 256 << 20)))

    def _ready(self):
        if self._state is None:   # caches registered without _build (not reached through vLLM)
            self._build()
        return self._paged, self._state

    def shutdown(self) -> None:
        """vLLM stops the worker: pending records, then the pool's final save."""
        if self._state is not None:
            self._state.flush()
        if self.store is not None:
            self.store.close()

    @property
    def worker_state(self):
        """The worker's KVCOMM state (tests, diagnostics); None before the first step."""
        return self._state

    # ------------------------------------------------------------------ before the forward

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._meta()
        if not isinstance(meta, KVCommMeta) or not meta.loads:
            return
        paged, state = self._ready()
        t0 = time.perf_counter()
        for job in meta.loads:   # every failure below is reported, and vLLM recomputes
            try:
                staged = state.staged.get(job.req_id)
                if staged is not None:
                    k, v = staged
                else:
                    s0 = state.s0(job.agent_key)
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
        if log.isEnabledFor(logging.DEBUG):
            log.debug("kvcomm connector: %d loads %.1f ms", len(meta.loads), (time.perf_counter() - t0) * 1000.0)

    # ------------------------------------------------------------------ after the forward

    def wait_for_save(self):
        try:
            self._after_step()
        except Exception:   # KVCOMM's own failure: logged, and the engine goes on serving
            log.exception("kvcomm connector: the end-of-step work failed")

    def _after_step(self) -> None:
        meta = self._meta()
        if self.store is not None:
            self.store.maybe_save()
        if not isinstance(meta, KVCommMeta) or not (meta.saves or meta.captures or meta.plans or meta.drops):
            return
        paged, state = self._ready()
        t0 = time.perf_counter()
        spent: dict[str, float] = {}   # ms per kind of work, for the DEBUG line
        # Records last: a call the scheduler decided without waiting for a plan (dense from its
        # exact prefix) is planned in the step after its prefill, before its KV is recorded.
        saves = sorted(meta.saves, key=lambda j: j.kind == "record")
        records = [j for j in saves if j.kind == "record"]
        with torch.inference_mode():
            for job in saves[:len(saves) - len(records)]:
                self._save_logged(paged, state, job, spent)
            t = time.perf_counter()
            for job in meta.captures:
                try:
                    k, v = paged.read(job.block_ids, job.start, job.stop)
                    state.add_reply(job.call, tuple(job.ids), k, v, job.start)
                except Exception as e:
                    log.error("kvcomm connector: capturing the reply of %s failed: %s", job.req_id, e)
                finally:
                    self._sent.add(job.req_id)   # the blocks may be freed now, captured or not
            t = _spent(spent, "capture", t, bool(meta.captures))
            for job in meta.plans:
                try:
                    res = state.plan(job.req_id, job.ids, job.call, cached=job.cached)
                except Exception as e:
                    log.exception("kvcomm connector: planning %s failed", job.req_id)
                    state.drop(job.req_id)
                    res = PlanResult("dense", f"planning failed: {e}", 0)
                self._results[job.req_id] = res
            _spent(spent, "plan", t, bool(meta.plans))
            for job in records:
                self._save_logged(paged, state, job, spent)
            for req_id in meta.drops:
                state.drop(req_id)
        state.trim_heap_later()
        if log.isEnabledFor(logging.DEBUG):   # what the step's first tokens waited for
            log.debug("kvcomm connector: end-of-step work %.1f ms (%d saves, %d captures, %d plans)%s",
                      (time.perf_counter() - t0) * 1000.0, len(saves), len(meta.captures), len(meta.plans),
                      "".join(f"; {k} {ms:.1f} ms" for k, ms in spent.items()))

    def _save_logged(self, paged, state, job: SaveJob, spent: dict) -> None:
        t = time.perf_counter()
        try:
            self._save(paged, state, job)
        except Exception as e:
            log.error("kvcomm connector: saving %s (%s) failed: %s", job.req_id, job.kind, e)
        finally:
            if job.release:
                self._sent.add(job.req_id)   # read (or not): the finished request's blocks may go
            _spent(spent, job.kind, t)

    def _save(self, paged, state, job: SaveJob) -> None:
        from ..plan.template import PromptLayout
        p = job.params
        T = job.prompt_len
        if job.kind == "template":
            k, v = paged.read(job.block_ids, 0, T - 1)
            lay = PromptLayout(ids=list(p["ids_list"]), spans=[tuple(s) for s in p["spans"]],
                               segments=[tuple(s) for s in p["segments"]], s0=p["s0"], problem=p.get("problem"))
            state.add_template(p["agent_key"], p["agent"], p.get("system", ""), p["template"], lay, k, v,
                               p.get("pool_key"))
        elif job.kind == "encode":
            h = int(p["header"])
            k, v = paged.read(job.block_ids, h, T)
            state.add_encoding(p["session"], p["kind"], tuple(p["content_ids"]), k, v, h, slot=p.get("slot"))
        elif job.kind == "record":   # from the first position it records: a partial call's end
            start = state.record_start(job.req_id)
            if start is not None:
                k, v = paged.read(job.block_ids, start, T - 1)
                state.record_later(job.req_id, k, v, start)
        elif job.kind == "save":   # the server is about to stop (kvcomm.vllm.supervise): save now
            state.flush()
            if self.store is not None and not self.store.save():
                raise RuntimeError(f"saving the anchor pool failed: {self.store.last_error}")

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


def _spent(spent: dict, kind: str, since: float, did: bool = True) -> float:
    """Adds the ms since `since` to spent[kind] (when there was work of that kind); returns now."""
    now = time.perf_counter()
    if did:
        spent[kind] = spent.get(kind, 0.0) + (now - since) * 1000.0
    return now
