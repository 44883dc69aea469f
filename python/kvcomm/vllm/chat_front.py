"""Plain chat requests in the server's front end: the layout inferred (kvcomm.plan.chat), and
what the server saw and produced remembered for the requests after them.

A chat completion without KVCOMM parameters - what agent frameworks send - is laid out from
its messages: when it carries text the server met before, it becomes a KVCOMM call on the
inferred template, in the inferred (or given) session; when it carries nothing known it is
passed on untouched, served exactly as plain vLLM serves it (its prefix cache included).
Either way its user and tool texts, and the reply the server generates, are remembered.

Tenants: texts are matched only within one tenant - the caller's API key (a hash of the
Authorization header) unless the server names another header (`tenant_header`) - so one
tenant's text never becomes another tenant's content, and sessions are scoped to the tenant.
The session is the X-KVCOMM-Session header or the request's `user` field when given.
"""
from __future__ import annotations

import hashlib
import logging
import uuid

from ..plan.chat import DEFAULT_MIN_TOKENS, ChatCall, ChatError, infer
from ..plan.contents import ContentIndex
from .protocol import Call

log = logging.getLogger("kvcomm.vllm")

CHAT_ARGS = "chat"   # the kv_connector_extra_config entry holding the chat SETTINGS
SETTINGS = ("enabled", "min_tokens", "tenant_header", "index_bytes", "encode_ahead", "tail")
# The last prompt tokens an inferred chat call computes (vLLM runs them in context instead of
# loading estimates): a framework's request ends in the latest messages and the turn header,
# which the next token depends on most. Chosen on the recorded AutoGen and LangGraph traffic
# (docs/serving.md): first-token agreement with dense 94.4% / 94.4% with 8, 98.9% / 94.4% with
# 48, 98.9% with 96 on LangGraph (KL 0.0033), for 51% of the tokens reused instead of 56-58%.
# Explicit calls keep the connector's own short tail.
DEFAULT_TAIL = 96
SESSION_HEADER = b"x-kvcomm-session"


class ChatFront:
    def __init__(self, tokenizer, specials: tuple[str, ...], settings: dict | None = None):
        s = dict(settings or {})
        unknown = sorted(set(s) - set(SETTINGS))
        if unknown:
            raise ValueError(f"kvcomm: unknown chat setting(s) {', '.join(unknown)}")
        self.enabled = bool(s.get("enabled", True))
        self.min_tokens = int(s.get("min_tokens", DEFAULT_MIN_TOKENS))
        # After a request served plainly, its texts are encoded at once (off its critical path)
        # so that the agents reading them next reuse them; on traffic that is mostly not
        # multi-agent that is one more prefill of every user text, which runs beside the
        # requests after it. Off: a text's first reader computes it, its encoding runs then.
        self.encode_ahead = bool(s.get("encode_ahead", True))
        self.tail = s.get("tail", DEFAULT_TAIL)
        if isinstance(self.tail, bool) or not isinstance(self.tail, int) or self.tail < 1:
            raise ValueError(f"kvcomm: chat setting tail must be an int >= 1 (prompt tokens), got {self.tail!r}")
        self.tenant_header = str(s.get("tenant_header", "authorization")).lower().encode()
        self.index = ContentIndex(int(s.get("index_bytes", 64 << 20)))
        self.tok = tokenizer
        self.specials = specials
        self._secret = uuid.uuid4().hex   # salts no client can compute

    def salt(self, tenant: str) -> str:
        """vLLM's cache_salt of a tenant's chat traffic: its requests share one prefix cache,
        which no other tenant's request can hit (a client cannot name the salt: it holds a
        secret of this server process)."""
        return "kvcomm-tenant-" + hashlib.sha1(f"{self._secret}:{tenant}".encode()).hexdigest()[:16]

    def tenant(self, scope) -> str:
        value = dict(scope.get("headers", [])).get(self.tenant_header, b"")
        return hashlib.sha1(value).hexdigest()[:12]

    def applies(self, data) -> bool:
        # A request that names its own cache_salt has chosen its prefix-cache scope itself:
        # it is served as plain vLLM, in that scope, and nothing of it is remembered.
        return (self.enabled and isinstance(data, dict) and isinstance(data.get("messages"), list)
                and data.get("n", 1) in (1, None) and not data.get("kv_transfer_params")
                and not data.get("cache_salt"))

    def lay_out(self, data: dict, scope, tenant: str | None = None) -> tuple[Call | None, ChatCall | None, str]:
        """(the KVCOMM call, or None to serve it plainly; the inferred layout, None when the
        messages cannot be laid out; the tenant - the scope's unless given)."""
        tenant = self.tenant(scope) if tenant is None else tenant
        given = dict(scope.get("headers", [])).get(SESSION_HEADER, b"").decode() or data.get("user") or None
        try:
            chat = infer(data["messages"], self.tok, self.index, tenant, tools=data.get("tools"),
                         session=given if isinstance(given, str) else None, min_tokens=self.min_tokens,
                         specials=self.specials)
        except ChatError as e:
            log.debug("kvcomm: a chat request served plainly: %s", e)
            return None, None, tenant
        except Exception:   # the tokenizer's chat template refused them: vLLM will say why
            log.debug("kvcomm: a chat request's messages did not render", exc_info=True)
            return None, None, tenant
        if chat.template is None:
            return None, chat, tenant
        call = Call(agent=chat.agent, template=chat.template, system="", user_text=chat.text, spans=chat.spans,
                    session=f"{tenant}:{chat.session}", round=0, learn=True, raw=True, pool_key=chat.pool_key,
                    template_key=chat.template_key)
        return call, chat, tenant

    def remember(self, chat: ChatCall | None, tenant: str, reply: str, reply_ids=None) -> None:
        """After the response: the request's texts and the reply, for the requests after it."""
        if chat is None:
            return
        for text, kind, role in chat.remember:
            self.index.add(tenant, text, kind, role, chat.session)
        reply = (reply or "").strip()
        if reply:
            self.index.add(tenant, reply, "reply", chat.agent, chat.session, ids=reply_ids)
