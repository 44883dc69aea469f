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
2. worker, end of that step: the call planner (kvcomm.plan) decides every slot (the
   pool's share-or-anchor decision, reduced over tensor-parallel ranks) and plans the call
   as a prefix-only backend; S0 and the estimated slots go into a staging buffer; the
   answer (reuse / partial / dense, why, and the prefix) goes back in the step's worker
   metadata;
3. scheduler, next step: the plan's prefix is external - reuse: all prompt tokens but
   the recompute tail (vLLM computes the last token); partial: S0 and the estimated slots
   before the first one that cannot be estimated (vLLM computes the rest in context);
   dense: the exact S0 (vLLM prefills the rest for real). The choice is the scheduler's,
   made on the worker's answer, so nothing estimated is ever used where the worker could
   not estimate;
4. worker, that step: writes the staged KV (or S0) into the call's blocks with vLLM's
   own cache-write op before the forward;
5. dense and partial calls: when the prefill completes, the worker reads back the KV
   vLLM computed for the call's slots and records deltas into their anchors;
6. scheduler, request_finished: the reply's KV (generated tokens that were fed back)
   is read from the blocks before they are freed, as the base of
   {agent_<name>_current}; the response's kv_transfer_params say which path ran.
If a load fails anyway (a bug, a missing staging buffer), the worker reports the blocks
and vLLM recomputes them (kv_load_failure_policy "recompute"): a failure costs time,
never correctness. Requests without KVCOMM parameters are not touched.
"""
from __future__ import annotations

import logging
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from .settings import TOKEN

log = logging.getLogger("kvcomm.vllm")


class KVCommConnector(KVConnectorBase_V1):
    """The facade vLLM loads: its scheduler instance runs kvcomm.vllm.scheduler_side, its
    worker instances kvcomm.vllm.worker_side (each imported only in its own role)."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        if not extra.get(TOKEN):
            log.warning("kvcomm connector: no %r in kv_connector_extra_config; every request is served as "
                        "plain vLLM (start the server with `kvcomm serve`)", TOKEN)
        self._sched = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler_side import SchedulerSide
            self._sched = SchedulerSide(vllm_config, extra)
        else:
            from .worker_side import WorkerSide
            self._worker = WorkerSide(vllm_config, extra, self._get_connector_metadata)

    # ------------------------------------------------------------------ scheduler side
    # A failure of KVCOMM's own must cost one request its reuse, never the engine: each
    # entry point logs it and answers as a connector with nothing to offer would.

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception:
            log.exception("kvcomm connector: matching %s failed; served as plain vLLM", request.request_id)
            self._sched.forget(request.request_id)
            return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        try:
            return self._sched.update_state_after_alloc(request, blocks, num_external_tokens)
        except Exception:
            log.exception("kvcomm connector: allocating for %s failed", request.request_id)

    def build_connector_meta(self, scheduler_output):
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        try:
            return self._sched.update_connector_output(connector_output)
        except Exception:
            log.exception("kvcomm connector: reading the workers' answers failed")

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        try:
            return self._sched.request_finished(request, block_ids)
        except Exception:
            log.exception("kvcomm connector: finishing %s failed; its reply is not captured", request.request_id)
            return False, None

    # ------------------------------------------------------------------ worker side

    @property
    def worker_state(self):
        """The worker's KVCOMM state (tests, diagnostics); None before the first step."""
        return self._worker.worker_state

    @property
    def kept(self) -> dict:
        """keep_loads: req_id -> (K, V) read back after each load."""
        return self._worker.kept

    def register_kv_caches(self, kv_caches):
        return self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return self._worker.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        # Everything is read back in wait_for_save, after the step's forward has written
        # every layer: one read per job instead of one per layer.
        return None

    def wait_for_save(self):
        return self._worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]):
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self):
        return self._worker.build_connector_worker_meta()

    def shutdown(self):
        if self._worker is not None:
            self._worker.shutdown()
