"""The connector configuration and the `vllm serve` command line of a KVCOMM server."""
from __future__ import annotations

import json
import re
import secrets
import sys

CONNECTOR = "KVCommConnector"
MODULE = "kvcomm.vllm.connector"
MIDDLEWARE = "kvcomm.vllm.frontend.KVCommFrontend"


def new_token() -> str:
    """The secret the front end and the connector share: internal request fields
    carry it, so a client cannot forge them past a server without the front end."""
    return secrets.token_hex(16)


def transfer_config(token: str | None = None, pool: dict | None = None, pool_file: str | None = None,
                    lead_ins: dict | None = None, max_sessions: int | None = None,
                    keep_loads: bool = False, plan: dict | None = None, pool_new: bool = False,
                    save_every_s: float | None = None, save_every_anchors: int | None = None,
                    chat: dict | None = None, session_bytes: int | None = None) -> dict:
    """The --kv-transfer-config of a KVCOMM server (keys: kvcomm.vllm.settings).
    kv_load_failure_policy "recompute": a load that fails anyway is recomputed by vLLM
    instead of failing the request. plan: {"partial": bool, "recompute": "none" | "tail=N", "head_share": float,
    "estimate_anchors": int},
    checked here so a bad value fails before the server starts."""
    from . import settings
    extra = {settings.TOKEN: token or new_token()}
    if pool:
        extra[settings.POOL_ARGS] = dict(pool)
    if pool_file:
        extra[settings.POOL_FILE] = pool_file
    if lead_ins:
        extra[settings.LEAD_INS] = dict(lead_ins)
    if max_sessions:
        extra[settings.MAX_SESSIONS] = int(max_sessions)
    if keep_loads:
        extra[settings.KEEP_LOADS] = True
    if plan:
        extra[settings.PLAN_ARGS] = dict(plan)
        settings.plan_settings(extra)
    if pool_new:
        extra[settings.POOL_NEW] = True
    if save_every_s is not None:
        extra[settings.SAVE_EVERY_S] = float(save_every_s)
    if save_every_anchors is not None:
        extra[settings.SAVE_EVERY_ANCHORS] = int(save_every_anchors)
    if chat:
        from .chat_front import CHAT_ARGS
        extra[CHAT_ARGS] = dict(chat)
    if session_bytes is not None:
        extra[settings.SESSION_BYTES] = int(session_bytes)
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": MODULE, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def serve_argv(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
               max_model_len: int | None = None, served_model_name: str | None = None,
               kv_cache_bytes: int | None = None, extra_args: list[str] | None = None, **config) -> list[str]:
    """argv of `python -m kvcomm.vllm.supervise -- python -m kvcomm.vllm.vllm_cli serve MODEL ...`
    (the vLLM server with the connector and the front end, stopped so that its pool is saved).
    config: transfer_config's keyword arguments. kv_cache_bytes: vLLM's KV cache
    size (--kv-cache-memory-bytes; default_kv_cache_bytes sizes it from the machine)."""
    argv = [sys.executable, "-m", "kvcomm.vllm.supervise", "--",   # saves the pool before the server stops
            sys.executable, "-m", "kvcomm.vllm.vllm_cli", "serve", model, "--host", host, "--port", str(port),
            "--dtype", dtype, "--kv-transfer-config", json.dumps(transfer_config(**config)),
            "--middleware", MIDDLEWARE,
            # usage.prompt_tokens_details.cached_tokens: how many prompt tokens vLLM did not
            # compute (all but the last on the reuse path); streamed calls read their path there
            "--enable-prompt-tokens-details"]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if kv_cache_bytes:
        argv += ["--kv-cache-memory-bytes", str(int(kv_cache_bytes))]
    return argv + list(extra_args or [])


def memory_info() -> tuple[int, int]:
    """(total, available) bytes of this machine's memory (/proc/meminfo)."""
    vals = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            vals[key] = int(rest.split()[0]) * 1024
    return vals["MemTotal"], vals.get("MemAvailable", vals["MemFree"])


def default_kv_cache_bytes(total: int, available: int, model_bytes: int, pool_bytes: int = 0,
                           state_bytes: int = 0) -> int:
    """vLLM's KV cache on a CPU server, sized from the machine: a quarter of its memory, and
    never more than what is available after the weights (twice: vLLM loads, then converts),
    the anchor pool's budget, KVCOMM's session and template state (state_bytes) and 2 GiB of
    headroom for the processes; at least 1 GiB, in whole 256 MiB steps. (vLLM's own CPU
    default takes most of the memory.)"""
    gib = 1 << 30
    room = available - 2 * model_bytes - pool_bytes - state_bytes - 2 * gib
    size = max(gib, min(total // 4, room))
    return size - size % (256 << 20)


def free_port() -> int:
    """A free loopback port for a server this process starts."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A KVCOMM server in a child process, for tests and benchmarks:

        with Server(model_dir, log_path, dtype="float32") as client:   # a KVCommClient
            ...

    Starts `serve_argv(model, port=<free loopback port>, **kw)`, waits until /health
    answers (or the process exits, or `timeout` s pass: RuntimeError with the log's
    tail), and stops the process it started (terminate, then kill) on exit."""

    def __init__(self, model: str, log_path: str, *, timeout: float = 900.0, env: dict | None = None,
                 served_model_name: str = "kvcomm", **kw):
        self.model, self.log_path, self.timeout = model, log_path, timeout
        self.env, self.name, self.kw = env, served_model_name, kw
        self.proc = None

    def __enter__(self):
        import os
        import subprocess
        import time

        from .client import KVCommClient
        port = free_port()
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)   # the server runs its engine in its own processes
        env.update(self.env or {})
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(serve_argv(self.model, port=port, served_model_name=self.name, **self.kw),
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        client = KVCommClient(f"http://127.0.0.1:{port}", model=self.name)
        t0 = time.perf_counter()
        while not client.healthy():
            if self.proc.poll() is not None or time.perf_counter() - t0 > self.timeout:
                self.__exit__(None, None, None)
                with open(self.log_path) as f:
                    text = f.read()
                # KVCOMM's own reasons (an unusable pool file, a bad setting) first: the log's end
                # is the shutdown's tracebacks
                ours = re.findall(r"\w+Error: kvcomm[^\n]*", text)
                raise RuntimeError("the KVCOMM server did not start" + (f": {ours[-1]}" if ours else "")
                                   + f"; its log ends:\n{text[-4000:]}")
            time.sleep(1)
        self.startup_s = time.perf_counter() - t0
        return client

    def __exit__(self, *exc):
        import subprocess
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()   # the supervisor saves the pool, then stops the server
            try:
                self.proc.wait(420)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
        return False
