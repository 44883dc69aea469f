"""The connector configuration and the `vllm serve` command line of a KVCOMM server."""
from __future__ import annotations

import json
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
                    keep_loads: bool = False) -> dict:
    """The --kv-transfer-config of a KVCOMM server. kv_load_failure_policy "recompute":
    a load that fails anyway is recomputed by vLLM instead of failing the request."""
    extra = {"server_token": token or new_token()}
    if pool:
        extra["pool"] = dict(pool)
    if pool_file:
        extra["pool_file"] = pool_file
    if lead_ins:
        extra["lead_ins"] = dict(lead_ins)
    if max_sessions:
        extra["max_sessions"] = int(max_sessions)
    if keep_loads:
        extra["keep_loads"] = True
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": MODULE, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def serve_argv(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
               max_model_len: int | None = None, served_model_name: str | None = None,
               extra_args: list[str] | None = None, **config) -> list[str]:
    """argv of `python -m kvcomm.vllm.vllm_cli serve MODEL ...` with the connector and the
    front end. config: transfer_config's keyword arguments."""
    argv = [sys.executable, "-m", "kvcomm.vllm.vllm_cli", "serve", model, "--host", host, "--port", str(port),
            "--dtype", dtype, "--kv-transfer-config", json.dumps(transfer_config(**config)),
            "--middleware", MIDDLEWARE,
            # usage.prompt_tokens_details.cached_tokens: how many prompt tokens vLLM did not
            # compute (all but the last on the reuse path); streamed calls read their path there
            "--enable-prompt-tokens-details"]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return argv + list(extra_args or [])
