"""The server's KVCOMM front end: an ASGI middleware in vLLM's OpenAI server.

`kvcomm serve` adds it with `--middleware kvcomm.vllm.frontend.KVCommFrontend`. For
each POST /v1/chat/completions whose kv_transfer_params carry "kvcomm" it

1. validates the parameters against the request (kvcomm.vllm.protocol) and answers
   HTTP 400 with the reason when they are wrong; the server goes on serving;
2. lays the prompt out in tokens with the engine's own template code
   (kvcomm.plan.template: the chat frame around the user turn, token spans from
   character offsets), exactly as KVCommEngine lays out a call;
3. makes sure the engine has what the call may reuse, by sending internal requests
   to the engine (one-token generations whose prefill the connector reads back):
   - the agent's template KV, once per agent: the prompt rendered with the placeholder
     markers in place (KVCommEngine.add_agent's template pass);
   - the base KV of each question / tool result / reply content that is not a reply the
     engine captured: the content's tokens behind its kind's header
     (kvcomm.plan.headers: BOS + chat header + lead-in), once per session and content;
   these are waited for, so they count in the call's time to first token, as the
   engine's encodings do;
4. passes the call on with the layout under kv_transfer_params.kvcomm._server (with the
   connector's shared token) and a cache_salt: unique to an explicit call, so KV the
   connector estimates for it can never become another request's prefix-cache hit; the
   tenant's for plain chat traffic, whose requests share one prefix cache (ChatFront.salt).
Requests without KVCOMM parameters and not taken as chat traffic pass through untouched.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import NamedTuple

from ..plan.replies import BlankTokens, reply_span
from .chat_front import CHAT_ARGS, ChatFront
from .observe import CallReports, final_chunk, setup_logging
from .prepare import Internal, Preparer, kv_params
from .protocol import KEY, SERVER, Call, ParamError, kvcomm_params, parse_call
from .reply_trim import StreamTrim, extra_token_limit

log = logging.getLogger("kvcomm.vllm")

PATHS = ("/v1/chat/completions",)
SAVE_PATH = "/kvcomm/save"
_REMEMBER = 65536   # encodings / captured replies remembered (oldest forgotten first)


class _Track(NamedTuple):
    """What _watch follows of a call's response."""
    session: str
    agent: str
    round: int
    stream: bool
    chat: tuple | None      # (ChatCall, tenant) of an inferred call
    later: list             # internal requests deferred until its first token
    limit: int | None       # the client's max_tokens, where vLLM was asked for one more


class _LRU(OrderedDict):
    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > _REMEMBER:
            self.popitem(last=False)


class _Engine:
    """What the front end needs from the running server, found on first use."""

    def __init__(self, app):
        from transformers import AutoTokenizer

        from .settings import LEAD_INS, TOKEN, plan_settings
        state = app.state
        self.client = state.engine_client
        cfg = state.vllm_config
        ktc = cfg.kv_transfer_config
        extra = (ktc.kv_connector_extra_config or {}) if ktc is not None else {}
        self.token = extra.get(TOKEN)
        if not self.token:
            raise RuntimeError("kvcomm front end: the server's kv-transfer-config has no KVCommConnector with a "
                               "server_token (start it with `kvcomm serve`)")
        tok = AutoTokenizer.from_pretrained(cfg.model_config.tokenizer, local_files_only=True)
        self.prep = Preparer(tok, extra.get(LEAD_INS))
        self.defer = plan_settings(extra).defer_first_encoding
        self.stops = set()
        for t in (tok.eos_token_id, getattr(cfg.model_config.hf_config, "eos_token_id", None)):
            self.stops.update([t] if isinstance(t, int) else list(t or []))
        self.is_blank = BlankTokens(tok)
        self.decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)   # a stream delta's text
        self.chat = ChatFront(tok, self.prep.specials, extra.get(CHAT_ARGS))
        self.any_token = next(iter(sorted(self.stops)), 0)   # the one prompt token of a save request
        setup_logging()
        self.reports = CallReports()
        self.reports.watch(self.client)

    async def one_token(self, job: Internal) -> None:
        """An internal request: prefill job.ids, generate one token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        sp = SamplingParams(max_tokens=1, temperature=0.0,
                            extra_args={"kv_transfer_params": kv_params(job.server, self.token)})
        self.reports.metrics.internal_request(+1)
        try:
            async for _ in self.client.generate(TokensPrompt(prompt_token_ids=list(job.ids)), sp,
                                                f"kvcomm-{job.server['op']}-{uuid.uuid4().hex}"):
                pass
        finally:
            self.reports.metrics.internal_request(-1)


class KVCommFrontend:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app):
        self.app = app
        self._engine: _Engine | None = None
        self._agents: dict[str, asyncio.Future] = {}
        self._encoded: _LRU = _LRU()      # (session, kind, ids) -> Future
        self._replies: _LRU = _LRU()      # (session, agent, round) -> captured reply ids

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") == SAVE_PATH:
            return await self._save(scope, send)
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            return await self.app(scope, receive, send)
        chunks = []
        more = True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":   # the client left before sending everything
                async def then(first=msg):
                    return first
                return await self.app(scope, _replay(b"".join(chunks), then), send)
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        chat = None
        try:
            params = kvcomm_params(data) if isinstance(data, dict) else None
            if params is None:
                engine = self._get_engine(scope) if isinstance(data, dict) else None
                if engine is None or not engine.chat.applies(data):
                    return await self.app(scope, _replay(body, receive), send)
                # Plain chat traffic: KVCOMM where the server knows parts of it (chat_front.py)
                call, chat, tenant = engine.chat.lay_out(data, scope)
                if call is None:
                    # plain vLLM, in the tenant's own prefix cache (which its KVCOMM calls share)
                    data, request_id = _engine_request_id(scope, dict(data, cache_salt=engine.chat.salt(tenant)))
                    body = json.dumps(data).encode()
                    return await self.app(_with_length(scope, body), _replay(body, receive),
                                          self._remember_plain(send, engine, chat, tenant, data, request_id))
                params, chat = {}, (chat, tenant)
            else:
                engine = self._get_engine(scope)
                call = parse_call(data, engine.prep.specials)
            new_body, track = await self._prepare(engine, call, data, params, chat)
        except ParamError as e:
            return await _error(send, 400, str(e))
        except Exception as e:   # the server's own failure, not the client's
            log.exception("kvcomm front end: preparing a call failed")
            return await _error(send, 500, f"kvcomm front end: {e}", "InternalServerError")
        try:
            return await self.app(_with_length(scope, new_body), _replay(new_body, receive),
                                  self._watch(send, engine, track))
        finally:   # a call that failed or never streamed still starts what it deferred
            self._start_later(engine, track.later)

    async def _save(self, scope, send) -> None:
        """POST /kvcomm/save with the server's token (header X-KVCOMM-Token): the workers save
        their anchor pools now (kvcomm.vllm.supervise asks for it before stopping the server)."""
        engine = self._get_engine(scope)
        sent = dict(scope.get("headers", [])).get(b"x-kvcomm-token", b"").decode()
        if not sent or sent != engine.token:
            return await _error(send, 403, "kvcomm: /kvcomm/save needs the server's token", "PermissionError")
        job = Internal([engine.any_token], {"op": "save"}, ("save",))
        try:
            await engine.one_token(job)
        except Exception as e:
            return await _error(send, 500, f"kvcomm: saving the pool failed: {e}", "InternalServerError")
        body = json.dumps({"saved": True}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _get_engine(self, scope) -> _Engine:
        if self._engine is None:
            self._engine = _Engine(scope["app"])
        return self._engine

    # ------------------------------------------------------------------ one call

    async def _prepare(self, engine: _Engine, call: Call, data: dict, params: dict, chat=None):
        """(the call's new body, what _watch tracks). The internal requests the call needs are
        waited for, except those this call is the first to need: with deferral on (the
        default), a content's first carrier computes it in context, as plain vLLM does, and
        its encoding starts once the call streams its first token, for the calls after it
        (the agent's template pass too, when the call could not use it anyway)."""
        t0 = time.perf_counter()
        prep = engine.prep.prepare(call)
        later: list = []
        skip = set()
        for name, owner, rnd, ids in prep.replies:
            if self._replies.get((call.session, owner, rnd)) == ids:
                skip.add((call.session, "reply", ids))   # the engine captured it: its KV is the base
        waits, deferred, mine = [], [], set()
        for job in prep.encodes:
            if job.key in skip:
                continue
            # Plain chat traffic does not wait for an encoding still running (one an earlier
            # request started: the next agent's call comes at once): the call carries that
            # content as its first carrier would, computed in context, and its deltas are
            # recorded once the encoding is there - waiting would cost this call a prefill.
            running = chat is not None and job.key in self._encoded and not _done(self._encoded[job.key])
            if engine.defer and (job.key not in self._encoded or job.key in mine or running):
                if job.key not in mine and job.key not in self._encoded:   # two slots may hold one content
                    later.append(self._pending(self._encoded, job.key, job))
                mine.add(job.key)
                deferred.append(job.server["slot"])
            else:
                waits.append(self._once(self._encoded, job.key, engine, job))
        # A call whose first slot it carries first is computed from its exact prefix on (the
        # connector estimates a prefix only), so it reuses nothing the template pass would
        # give but S0: the pass can wait until after its first token too.
        first_deferred = bool(prep.lay.spans) and prep.lay.spans[0][0] in deferred
        # Plain chat traffic waits for no template pass either: a template seen for the first
        # time (or whose pass still runs) serves its call from vLLM's prefix cache, as plain
        # vLLM would, and the pass runs after the call's first token - for the template's later
        # calls (the same agent at the same point of other conversations).
        chat_dense = chat is not None and not _done(self._agents.get(prep.template.key))
        if prep.template.key not in self._agents and (first_deferred or chat is not None):
            later.append(self._pending(self._agents, prep.template.key, prep.template))
        elif not chat_dense:
            waits.append(self._once(self._agents, prep.template.key, engine, prep.template))
        log.debug("kvcomm front end: %s/%s waits for %d internal requests, defers %d (%s); laid out in %.1f ms",
                  call.session, call.agent, len(waits), len(later), deferred, (time.perf_counter() - t0) * 1000.0)
        try:
            if waits:
                await asyncio.gather(*waits)
                log.debug("kvcomm front end: %s/%s internal requests done after %.1f ms", call.session, call.agent,
                          (time.perf_counter() - t0) * 1000.0)
        except BaseException:   # what this call deferred still runs: later calls wait for it
            self._start_later(engine, later)
            raise
        server = dict(prep.server, token=engine.token, deferred=deferred)
        if chat is not None:   # an inferred chat call computes its last tokens (ChatFront.tail)
            server["tail"] = engine.chat.tail
        if first_deferred or chat_dense:
            # Dense from its exact prefix on, known here: the scheduler need not wait a step
            # for the worker's plan (kvcomm.vllm.scheduler_side). Without the template pass
            # yet, nothing is loaded: vLLM computes what its prefix cache does not hold.
            server["dense_prefix"] = prep.exact_prefix if _done(self._agents.get(prep.template.key)) else 0
            if not first_deferred:
                server["dense_reason"] = "a new chat template: served from vLLM's prefix cache, its pass after the call"
        out = dict(data)
        # A streamed call asks vLLM for one token more, which the client never sees: a reply
        # cut by max_tokens then has its last token fed, and its KV captured (reply_trim.py).
        extra = extra_token_limit(data)
        if extra is not None:
            out[extra[0]] = extra[1] + 1
            server["reply_limit"] = extra[1]
        params = dict(params)
        params[SERVER] = server
        out["kv_transfer_params"] = dict(data.get("kv_transfer_params") or {}, **{KEY: params})
        # Estimated KV must not become another request's prefix-cache hit. An explicit call's
        # salt is its own; an inferred chat call shares its tenant's prefix cache: vLLM serves
        # what the tenant's earlier requests computed (the agent's previous turn) and KVCOMM
        # estimates what follows, so a later request of the tenant that starts with this prompt
        # reuses its KV as any cached prefix (docs/serving.md, "Prefix caching").
        out["cache_salt"] = engine.chat.salt(chat[1]) if chat else f"kvcomm-{uuid.uuid4().hex}"
        stream = bool(data.get("stream"))
        if stream:
            out["return_token_ids"] = True   # the front end reads the reply's ids from the stream
        return json.dumps(out).encode(), _Track(call.session, call.agent, call.round, stream, chat, later,
                                                extra[1] if extra else None)

    def _pending(self, table, key, job: Internal):
        """A place-holder future for `job` in `table` (later calls wait on it); returns the
        (future, job) pair _start_later runs."""
        fut = asyncio.get_running_loop().create_future()
        if isinstance(table, _LRU):
            table.put(key, fut)
        else:
            table[key] = fut
        return table, key, fut, job

    def _start_later(self, engine: _Engine, later: list) -> None:
        """Runs deferred internal requests (once), resolving their place-holders."""
        while later:
            table, key, fut, job = later.pop()

            async def run(table=table, key=key, fut=fut, job=job):
                try:
                    log.debug("kvcomm front end: deferred %s request starts", job.server["op"])
                    await engine.one_token(job)
                    fut.set_result(None)
                except Exception as e:
                    table.pop(key, None)   # a later call tries again
                    log.error("kvcomm front end: a deferred %s request failed: %s", job.server["op"], e)
                    fut.set_exception(e)
                    fut.exception()   # retrieved: waiters log it themselves
            asyncio.ensure_future(run())

    async def _once(self, table, key, engine: _Engine, job: Internal) -> None:
        """Runs the internal request `job` once per key (concurrent calls share it). An
        agent's template that fails is retried by its next call; a failed encoding is
        logged and the call runs dense for that slot ("no base KV")."""
        fut = table.get(key)
        if fut is None:
            fut = asyncio.ensure_future(engine.one_token(job))
            if isinstance(table, _LRU):
                table.put(key, fut)
            else:
                table[key] = fut
        try:
            await asyncio.shield(fut)
        except Exception as e:
            table.pop(key, None)
            if job.server["op"] == "template":
                raise
            log.error("kvcomm front end: encoding a %s content failed: %s", job.server["kind"], e)

    # ------------------------------------------------------------------ the reply

    def _watch(self, send, engine: _Engine, track):
        """Passes the response on; remembers the reply the engine captured, so the next
        agent's call does not encode it again; gives a stream the call's report in one more
        chunk before its end (kvcomm.vllm.observe)."""
        session, agent, rnd, stream, chat, later, limit = track
        trim = StreamTrim(limit, engine.decode) if stream and limit else None
        state = {"status": 200, "buf": b"", "ids": [], "finish": None, "captured": None, "id": None,
                 "model": None, "text": [], "trim": trim}

        def sse_lines(data: bytes):
            state["buf"] += data
            *lines, state["buf"] = state["buf"].split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                try:
                    chunk = json.loads(line[5:])
                except ValueError:
                    continue
                state["id"] = state["id"] or chunk.get("id")
                state["model"] = state["model"] or chunk.get("model")
                for ch in chunk.get("choices") or []:
                    state["ids"].extend(ch.get("token_ids") or [])
                    state["text"].append((ch.get("delta") or {}).get("content") or "")
                    state["finish"] = ch.get("finish_reason") or state["finish"]

        def with_report(body: bytes) -> bytes:
            at = body.find(b"data: [DONE]")
            report = engine.reports.pop(state["id"]) if at >= 0 and state["id"] else None
            if report is None:
                return body
            return body[:at] + final_chunk(state["id"], state["model"], report) + body[at:]

        async def wrapped(msg):
            out = False
            if msg["type"] == "http.response.start":
                state["status"] = msg.get("status", 200)
            elif msg["type"] == "http.response.body" and state["status"] == 200:
                if stream:
                    if trim is not None:   # the extra token kept from the client
                        msg = dict(msg, body=trim.feed(msg.get("body", b""), msg.get("more_body", False)))
                    sse_lines(msg.get("body", b""))
                    if b"data: [DONE]" in msg.get("body", b""):
                        msg = dict(msg, body=with_report(msg["body"]))
                else:
                    state["buf"] += msg.get("body", b"")
                # a generated token is in this message (a stream's role-only chunk comes first)
                out = not stream or bool(state["ids"]) or any(state["text"]) or not msg.get("more_body", False)
                if not msg.get("more_body", False):
                    self._remember(engine, session, agent, rnd, stream, state, chat)
            await send(msg)
            if out or msg["type"] == "http.response.body" and not msg.get("more_body", False):
                # The first token is on its way to the client: only now the deferred work (a
                # content's encoding, a template pass: a whole prefill) may take the engine,
                # which would otherwise hold the first token's delivery on a busy machine.
                self._start_later(engine, later)
        return wrapped

    def _remember(self, engine: _Engine, session, agent, rnd, stream, state, chat=None) -> None:
        ids, text = None, "".join(state["text"])
        try:
            if stream:
                if state["finish"] in ("stop", "length"):
                    extra = int(state["trim"] is not None and state["trim"].trimmed)   # generated, not shown
                    lo, hi, fed = reply_span(state["ids"], engine.stops, engine.is_blank,
                                             generated=len(state["ids"]) + extra)
                    ids = state["ids"][lo:hi] if fed else None
            else:
                resp = json.loads(state["buf"])
                ids = ((resp.get("kv_transfer_params") or {}).get(KEY) or {}).get("reply_ids")
                text = ((resp.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        except Exception:   # nothing remembered: the next agent encodes the reply
            ids = None
        if ids:
            self._replies.put((session, agent, rnd), tuple(ids))
        if chat is not None and state["status"] == 200:
            engine.chat.remember(chat[0], chat[1], text, ids)
            if not ids and text.strip():   # a reply the connector could not capture: encoded ahead
                rids = engine.prep.tok(text.strip(), add_special_tokens=False)["input_ids"]
                job = engine.prep.encode_job(session, "reply", rids)
                if job.key not in self._encoded:
                    asyncio.ensure_future(self._once(self._encoded, job.key, engine, job))

    def _remember_plain(self, send, engine: _Engine, chat, tenant: str, data: dict, request_id: str):
        """Passes a plain chat response on and remembers its texts and reply (chat_front.py).

        The request's texts are encoded while it runs - a streamed one's from its first output,
        a non-streamed one's from its start (its client sees nothing before the end; see
        CallReports.when_free): a framework sends the next agent's request the moment this
        response ends, and encoded only then, that agent's call would wait for the encoding
        (about a prefill of the texts) before it could reuse them. Its reply is encoded at the
        end."""
        stream = bool(data.get("stream"))
        state = {"status": 200, "buf": b"", "early": False}
        ahead = engine.chat.encode_ahead and chat is not None

        def free():   # inside the engine client's generate: the work is scheduled
            state["early"] = True
            asyncio.get_running_loop().call_soon(self._texts_ahead, engine, chat, tenant, data)
        if ahead:
            engine.reports.when_free(request_id, free)

        async def wrapped(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg.get("status", 200)
            elif msg["type"] == "http.response.body" and state["status"] == 200:
                state["buf"] += msg.get("body", b"")
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                engine.reports.forget_when_free(request_id)
                if state["status"] == 200:
                    reply = _reply_text(state["buf"], stream)
                    engine.chat.remember(chat, tenant, reply)
                    if ahead:   # the texts once: while it ran, or now
                        self._encode_ahead(engine, chat, tenant, data, reply, texts=not state["early"])
            await send(msg)
        return wrapped

    def _texts_ahead(self, engine: _Engine, chat, tenant: str, data: dict) -> None:
        """A plain request's texts remembered and encoded while it still decodes."""
        engine.chat.remember(chat, tenant, "")
        self._encode_ahead(engine, chat, tenant, data, "")

    def _encode_ahead(self, engine: _Engine, chat, tenant: str, data: dict, reply: str, texts: bool = True) -> None:
        """For a plain chat request: its texts and its reply (when `reply` is not empty; the
        texts are encoded while the request runs, its reply at the end), encoded
        in its session, off every call's critical path - the agents that read them next then find
        their bases and can reuse them instead of being their first carrier. A text already
        encoded or being encoded is not encoded again. texts=False: the reply only (the texts
        were taken while it ran; laying the request out again would find nothing new)."""
        if chat is None:
            return
        jobs = []
        if texts:
            again, _, _ = engine.chat.lay_out(data, {"headers": []}, tenant=tenant)   # its texts are known now
            jobs = engine.prep.prepare(again).encodes if again is not None else []
        text = reply.strip()
        if text:
            ids = engine.prep.tok(text, add_special_tokens=False)["input_ids"]
            jobs.append(engine.prep.encode_job(f"{tenant}:{chat.session}", "reply", ids))
        for job in jobs:
            if job.key not in self._encoded:
                asyncio.ensure_future(self._once(self._encoded, job.key, engine, job))


def _engine_request_id(scope, data: dict) -> tuple[dict, str]:
    """(the body, the id vLLM's chat server gives the engine for it): "chatcmpl-" and the
    X-Request-Id header, else the body's request_id - which a request naming neither gets here
    (random, as vLLM's own), so the front end knows which engine request is this one."""
    header = next((v for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), None)
    if header is not None:
        return data, "chatcmpl-" + header.decode("latin-1")
    if "request_id" not in data:
        data = dict(data, request_id=uuid.uuid4().hex)
    return data, f"chatcmpl-{data['request_id']}"


def _reply_text(body: bytes, stream: bool) -> str:
    """The generated text of a chat completion response (JSON, or server-sent events)."""
    try:
        if not stream:
            return ((json.loads(body).get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        out = []
        for line in body.split(b"\n"):
            line = line.strip()
            if line.startswith(b"data:") and line != b"data: [DONE]":
                for ch in json.loads(line[5:]).get("choices") or []:
                    out.append((ch.get("delta") or {}).get("content") or "")
        return "".join(out)
    except (ValueError, AttributeError, IndexError):
        return ""


def _done(fut) -> bool:
    """A finished, successful internal request."""
    return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None


def _with_length(scope, body: bytes):
    """The scope with its content-length header set for a rewritten body."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    return dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])


def _replay(body: bytes, then):
    """A receive() that gives the (possibly rewritten) body, then the client's own
    messages (a disconnect)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()
    return receive


async def _error(send, status: int, message: str, kind: str = "BadRequestError") -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
