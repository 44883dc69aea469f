"""A small client for a KVCOMM vLLM server (HTTP from the standard library).

    from kvcomm.vllm.client import KVCommClient
    client = KVCommClient("http://127.0.0.1:8000")
    client.add_agent("solver", "You solve math problems.", "Problem:\\n{user_question}\\n\\nSolve it.")
    eng = client.engine()                    # the KVCommEngine interface, over HTTP
    eng.new_request()
    out = eng.call("solver", {"user_question": "What is 2 + 3?"}, max_new_tokens=64)
    out.text, out.path, out.ttft_ms

`chat_body` turns an agent call (template + inputs, as KVCommEngine.add_agent / call take
them) into the chat-completion body with the KVCOMM parameters; any OpenAI client can
send it (the parameters go in the body's "kv_transfer_params"; with the openai package:
extra_body={"kv_transfer_params": ...}). A call in mode "dense" sends the same messages
without them and with a cache_salt of the baseline's own (BASELINE_SALT): plain vLLM, the
baseline - its prefix cache holds the baseline's earlier requests (the agents' system
prompts) and nothing KVCOMM computed, and the server takes it for no chat traffic (a request
that names its own cache_salt is served plainly and nothing of it is remembered or encoded
ahead, which would otherwise run beside the requests after it).

`RemoteEngine` has the interface the agent runtime drives (add_agent, new_request,
next_round, call -> a record with text, path, reason, ttft_ms, ...), so the runtime's
graphs run against the server; one RemoteEngine runs one multi-agent request at a time,
and several of them (threads) run requests concurrently against one server.
"""
from __future__ import annotations

import http.client
import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

from ..plan.template import AGENT_NAME_RE, fill, parse_template

KVCOMM, DENSE = "kvcomm", "dense"
BASELINE_SALT = "kvcomm-baseline"   # dense-mode calls: plain vLLM in a prefix cache of their own


class ServerError(RuntimeError):
    """The server answered with an error status; .status and .message say which."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class RemoteCall:
    """What one call did, with the fields of kvcomm.engine.AgentCall the runtime reads."""
    agent: str
    text: str
    mode: str
    path: str                 # "reuse", "partial", "dense" (KVCOMM's path) or "baseline" (plain vLLM)
    reason: str
    ttft_ms: float            # request sent -> first generated token received (includes the
                              # server's template pass and content encodings)
    timings: dict
    first_token_id: int | None
    prompt_tokens: int
    new_tokens: int
    slot_decisions: dict = field(default_factory=dict)
    slot_gates: dict = field(default_factory=dict)
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    kv: dict = field(default_factory=dict)        # the response's kv_transfer_params["kvcomm"]
    cached_tokens: int | None = None              # streamed: prompt tokens vLLM reports it did not compute


class KVCommClient:
    """base_url: the server (http://host:port); model: the served model name (the
    server's only model when None)."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 600.0):
        u = urllib.parse.urlparse(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"base_url must be http://host:port, got {base_url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.timeout = timeout
        self._model = model
        self.agents: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------ HTTP

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def get(self, path: str) -> dict:
        c = self._conn()
        try:
            c.request("GET", path)
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                raise ServerError(r.status, data.decode(errors="replace"))
            return json.loads(data) if data else {}
        finally:
            c.close()

    def post(self, path: str, body: dict, headers: dict | None = None) -> dict:
        """POST a JSON body; the decoded answer, or ServerError with the server's message."""
        c = self._conn()
        try:
            c.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                try:
                    msg = json.loads(data)["error"]["message"]
                except Exception:
                    msg = data.decode(errors="replace")
                raise ServerError(r.status, msg)
            return json.loads(data)
        finally:
            c.close()

    def stream(self, path: str, body: dict, headers: dict | None = None):
        """POST with "stream": true; yields (seconds since sent, chunk) per SSE data line."""
        c = self._conn()
        t0 = time.perf_counter()
        try:
            c.request("POST", path, json.dumps(dict(body, stream=True)),
                      {"Content-Type": "application/json", **(headers or {})})
            r = c.getresponse()
            if r.status != 200:
                data = r.read()
                try:
                    msg = json.loads(data)["error"]["message"]
                except Exception:
                    msg = data.decode(errors="replace")
                raise ServerError(r.status, msg)
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                yield time.perf_counter() - t0, json.loads(payload)
        finally:
            c.close()

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.get("/v1/models")["data"][0]["id"]
        return self._model

    def healthy(self) -> bool:
        c = self._conn()
        try:
            c.request("GET", "/health")
            return c.getresponse().status == 200
        except OSError:
            return False
        finally:
            c.close()

    # ------------------------------------------------------------------ agent calls

    def add_agent(self, name: str, system_prompt: str, template: str) -> None:
        if not isinstance(name, str) or not AGENT_NAME_RE.fullmatch(name):
            raise ValueError(f"agent name {name!r}: use letters, digits, '_' or '-'")
        parse_template(template)   # a bad template fails here, not on the server
        self.agents[name] = (system_prompt or "", template)

    def chat_body(self, agent: str, inputs: dict, *, session: str | None = None, round: int = 0,
                  mode: str = KVCOMM, max_tokens: int = 128, temperature: float = 0.0, learn: bool = True,
                  **extra) -> dict:
        """The chat-completion body of one agent call (see the module docstring)."""
        if agent not in self.agents:
            raise KeyError(f"unknown agent {agent!r}; add it with add_agent first")
        if mode not in (KVCOMM, DENSE):
            raise ValueError(f"mode must be {KVCOMM!r} or {DENSE!r}, got {mode!r}")
        system, template = self.agents[agent]
        user, spans = fill(parse_template(template), dict(inputs), agent)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        body = {"model": self.model, "messages": msgs, "max_tokens": int(max_tokens),
                "temperature": float(temperature), **extra}
        if mode == KVCOMM:
            body["kv_transfer_params"] = {"kvcomm": {
                "agent": agent, "template": template, "slots": {n: [a, b] for n, a, b in spans},
                "session": session or uuid.uuid4().hex, "round": int(round), "learn": bool(learn)}}
        else:
            body.setdefault("cache_salt", BASELINE_SALT)
        return body

    def call(self, agent: str, inputs: dict, *, session: str | None = None, round: int = 0, mode: str = KVCOMM,
             max_tokens: int = 128, temperature: float = 0.0, learn: bool = True, stream: bool = True) -> RemoteCall:
        """One agent call. stream=True measures the time to the first token (TTFT) and
        reads the generated ids from the stream; stream=False returns the server's
        KVCOMM report (which path, why, per slot)."""
        body = self.chat_body(agent, inputs, session=session, round=round, mode=mode, max_tokens=max_tokens,
                              temperature=temperature, learn=learn)
        t0 = time.perf_counter()
        if not stream:
            resp = self.post("/v1/chat/completions", body)
            total = (time.perf_counter() - t0) * 1000.0
            ch = resp["choices"][0]
            kv = ((resp.get("kv_transfer_params") or {}).get("kvcomm") or {}) if mode == KVCOMM else {}
            usage = resp.get("usage") or {}
            return RemoteCall(agent, ch["message"].get("content") or "", mode,
                              kv.get("path", "baseline" if mode == DENSE else "?"),
                              kv.get("reason", "plain vLLM" if mode == DENSE else ""), float("nan"),
                              {"total": total}, None, int(usage.get("prompt_tokens", 0)),
                              int(usage.get("completion_tokens", 0)), kv.get("slots", {}), {}, [],
                              ch.get("finish_reason"), kv)
        body["return_token_ids"] = True
        body["stream_options"] = {"include_usage": True}
        text, ids, ttft, finish, usage, kv = [], [], None, None, {}, {}
        for t, chunk in self.stream("/v1/chat/completions", body):
            kv = ((chunk.get("kv_transfer_params") or {}).get("kvcomm") or kv) if mode == KVCOMM else kv
            for ch in chunk.get("choices") or []:
                tok = ch.get("token_ids") or []
                if ttft is None and (tok or (ch.get("delta") or {}).get("content")):
                    ttft = t * 1000.0
                ids.extend(tok)
                text.append((ch.get("delta") or {}).get("content") or "")
                finish = ch.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
        total = (time.perf_counter() - t0) * 1000.0
        prompt = int(usage.get("prompt_tokens", 0))
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        path, reason = "baseline", "plain vLLM"
        if mode == KVCOMM:
            # The server's front end sends the call's report in a last chunk (kvcomm.vllm.observe).
            path, reason = kv.get("path", "?"), kv.get("reason", "")
        return RemoteCall(agent, "".join(text), mode, path, reason, float(ttft if ttft is not None else total),
                          {"total": total}, ids[0] if ids else None, prompt,
                          int(usage.get("completion_tokens", len(ids))), kv.get("slots", {}), {}, ids, finish, kv,
                          cached)

    def engine(self, *, stream: bool = False, learn: bool = True) -> "RemoteEngine":
        return RemoteEngine(self, stream=stream, learn=learn)


class RemoteEngine:
    """The KVCommEngine interface over a KVCOMM server, for the agent runtime.

    stream=False (default): each call reports the server's path, reason and per-slot
    decisions (the response's kv_transfer_params); stream=True measures TTFT too and
    tells the path from the prompt tokens vLLM reports as cached."""

    def __init__(self, client: KVCommClient, *, stream: bool = False, learn: bool = True):
        self.client = client
        self.stream = stream
        self.learn = learn
        self.session: str | None = None
        self.round = 0
        self.calls = {"reuse": 0, "partial": 0, "dense": 0, "baseline": 0}

    @property
    def agents(self):
        return self.client.agents

    def add_agent(self, name: str, system_prompt: str, template: str) -> None:
        if name not in self.client.agents:
            self.client.add_agent(name, system_prompt, template)

    def new_request(self) -> None:
        self.session = uuid.uuid4().hex
        self.round = 0

    def next_round(self) -> None:
        if self.session is None:
            self.new_request()
        self.round += 1

    def call(self, agent: str, inputs: dict, *, mode: str = KVCOMM, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, **_) -> RemoteCall:
        if self.session is None:
            self.new_request()
        out = self.client.call(agent, inputs, session=self.session, round=self.round, mode=mode,
                               max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                               learn=self.learn, stream=self.stream)
        key = out.path if out.path in self.calls else None
        if key:
            self.calls[key] += 1
        return out

    def stats(self) -> dict:
        return {"calls": dict(self.calls), "server": f"http://{self.client.host}:{self.client.port}"}
