"""What an operator sees of KVCOMM calls: one log line per call, Prometheus metrics next to
vLLM's own on /metrics, and the call's report for clients that stream.

The server's front end wraps the engine client's `generate` (CallReports.watch): every
KVCOMM call's final output carries the connector's report (path, reason, tokens reused,
per-slot decisions, the pool's size) in its kv_transfer_params. A non-streamed response
returns it as vLLM does; a streamed one gets it in one more chunk before `data: [DONE]`
(final_chunk: no choices, like the usage chunk, so OpenAI clients accept it).
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from .protocol import KEY, SERVER

log = logging.getLogger("kvcomm.vllm")


def setup_logging() -> None:
    """KVCOMM's log lines next to vLLM's (vLLM configures only its own "vllm" logger): INFO
    by default, KVCOMM_LOG_LEVEL to change it."""
    import os
    if log.handlers:
        return
    handler = logging.StreamHandler()
    # milliseconds: a call's steps (front end, plan, load, first token) are tens of ms apart
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s.%(msecs)03d [kvcomm] %(message)s",
                                           "%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(os.environ.get("KVCOMM_LOG_LEVEL", "INFO").upper())
    log.propagate = False

_KEEP = 4096   # reports kept for streams still being written (oldest dropped first)

# Why a call (or a slot) was not estimated, in a few stable classes (the metric's label).
_REASON_CLASSES = (("planning failed", "planning_failed"), ("not registered", "agent_not_registered"),
                   ("too_few_candidates", "too_few_anchors"), ("entropy_above_gate", "entropy_gate"),
                   ("no deltas", "no_deltas_for_agent"), ("no usable anchor", "no_deltas_for_agent"),
                   ("no base KV", "no_base"), ("after a computed slot", "after_computed_slot"),
                   ("RoPE", "position_limit"), ("boundary token", "layout"), ("differ", "layout"),
                   ("ranks disagree", "ranks_disagree"), ("finished before planning", "not_planned"))


def reason_class(reason: str) -> str:
    for needle, label in _REASON_CLASSES:
        if needle in reason:
            return label
    return "other"


class _Metrics:
    """The Prometheus series (prometheus_client's default registry, which vLLM's /metrics
    serves); no-ops when prometheus_client is missing."""

    def __init__(self):
        try:
            from prometheus_client import Counter, Gauge
        except ImportError:   # a vLLM install always has it; a bare test environment may not
            self.on = False
            return
        self.on = True
        self.calls = Counter("kvcomm_calls_total", "KVCOMM agent calls by path", ["path"])
        self.fallbacks = Counter("kvcomm_fallbacks_total", "KVCOMM calls not fully reused, by reason",
                                 ["reason"])
        self.slots = Counter("kvcomm_slot_decisions_total", "Slot decisions of KVCOMM calls", ["decision"])
        self.prompt = Counter("kvcomm_prompt_tokens_total", "Prompt tokens of KVCOMM calls")
        self.reused = Counter("kvcomm_reused_tokens_total",
                              "Prompt tokens of KVCOMM calls the model did not compute (exact prefix included)")
        self.anchors = Gauge("kvcomm_pool_anchors", "Anchors in the KVCOMM pool")
        self.pool_bytes = Gauge("kvcomm_pool_bytes", "Bytes held by the KVCOMM pool")
        # the server's own work beside the clients' requests (template passes, encodings): a
        # benchmark waits for 0 before timing another mode, an operator sees background load
        self.internal = Gauge("kvcomm_internal_requests", "KVCOMM internal requests (template passes, "
                              "encodings) in flight")

    def internal_request(self, delta: int) -> None:
        if self.on:
            self.internal.inc(delta)

    def observe(self, r: dict) -> None:
        if not self.on:
            return
        path = r.get("path", "none")
        self.calls.labels(path).inc()
        if path != "reuse":
            self.fallbacks.labels(reason_class(r.get("reason", ""))).inc()
        for text in (r.get("slots") or {}).values():
            self.slots.labels("share" if text.startswith("share") and "computed" not in text
                              else reason_class(text)).inc()
        self.prompt.inc(int(r.get("prompt_tokens") or 0))
        self.reused.inc(int(r.get("reused_tokens") or 0))
        if r.get("pool_anchors") is not None:
            self.anchors.set(r["pool_anchors"])
            self.pool_bytes.set(r["pool_bytes"])


_METRICS: _Metrics | None = None   # one set per process: prometheus_client refuses duplicates


def _metrics() -> _Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = _Metrics()
    return _METRICS


class CallReports:
    """Reports of finished KVCOMM calls by request id; logs and counts each one. Also runs what
    the front end asked to run beside a request once that no longer delays its client (when_free)."""

    def __init__(self):
        self._by_id: OrderedDict[str, dict] = OrderedDict()
        self._when_free: dict[str, Callable[[], None]] = {}
        self.metrics = _metrics()

    def when_free(self, request_id: str, callback: Callable[[], None]) -> None:
        """callback() runs once, as soon as work beside request `request_id` is free for its
        client (no longer delays what the client waits for): at the request's first output
        (its prefill done, its first token generated) when it streams; at its start when its
        client gets one output at the end (vLLM's FINAL_ONLY, every non-streamed response) -
        the engine gives no output before the last, and work beside its prefill costs that
        client what work beside its decode would. The front end cannot tell these apart from
        the bytes it passes on. It must be quick: it runs inside the engine client's generate."""
        self._when_free[request_id] = callback

    def forget_when_free(self, request_id: str) -> None:
        """Forgets request_id's callback (its response ended)."""
        self._when_free.pop(request_id, None)

    def _run_when_free(self, request_id: str) -> None:
        callback = self._when_free.pop(request_id, None)
        if callback is not None:
            try:
                callback()
            except Exception:   # the request itself goes on
                log.exception("kvcomm: work beside a request failed to start")

    def watch(self, engine_client) -> None:
        """Wraps engine_client.generate (once) so every KVCOMM call's report is seen."""
        if getattr(engine_client, "_kvcomm_watched", False):
            return
        inner = engine_client.generate

        async def generate(prompt, sampling_params, request_id, *args, **kwargs):
            t0 = time.perf_counter()
            waiting = True   # for the moment work beside it is free
            if _final_only(sampling_params):   # no output before the last one: now
                waiting = False
                self._run_when_free(request_id)
            try:
                async for out in inner(prompt, sampling_params, request_id, *args, **kwargs):
                    if waiting:   # its first output
                        waiting = False
                        self._run_when_free(request_id)
                    if getattr(out, "finished", False):
                        self._finished(request_id, out, sampling_params, time.perf_counter() - t0)
                    yield out
            finally:   # a request that failed or was aborted before any output
                self._when_free.pop(request_id, None)

        engine_client.generate = generate
        engine_client._kvcomm_watched = True

    def _finished(self, request_id: str, out, sampling_params, seconds: float) -> None:
        report = ((getattr(out, "kv_transfer_params", None) or {}).get(KEY) or {})
        if "path" not in report:   # a plain request, or an internal one (template, encoding)
            return
        try:
            sent = (sampling_params.extra_args or {})["kv_transfer_params"][KEY][SERVER]
        except (AttributeError, KeyError, TypeError):
            sent = {}
        report = {k: v for k, v in report.items() if k != "reply_ids"}
        self._by_id[request_id] = report
        while len(self._by_id) > _KEEP:
            self._by_id.popitem(last=False)
        log.info("kvcomm call %s agent=%s session=%s round=%s path=%s reused=%s/%s pool=%s anchors: %s (%.0f ms)",
                 request_id, sent.get("agent", report.get("agent")), sent.get("session", report.get("session")),
                 sent.get("round", 0), report.get("path"), report.get("reused_tokens"), report.get("prompt_tokens"),
                 report.get("pool_anchors"), report.get("reason"), seconds * 1000.0)
        self.metrics.observe(report)

    def pop(self, request_id: str) -> dict | None:
        return self._by_id.pop(request_id, None)


def _final_only(sampling_params) -> bool:
    """Whether the engine gives this request one output, at its end (RequestOutputKind.FINAL_ONLY)."""
    return getattr(getattr(sampling_params, "output_kind", None), "name", None) == "FINAL_ONLY"


def final_chunk(chat_id: str, model: str | None, report: dict) -> bytes:
    """The SSE event that gives a streaming client the call's report."""
    chunk = {"id": chat_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [], "kv_transfer_params": {KEY: report}}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"
