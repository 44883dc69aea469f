"""KVCommEngine.chat: plain chat messages in, KVCOMM where the layout can be inferred.

The transformers backend of kvcomm.plan.chat: a request's messages are rendered with the
chat template, contents the engine has met before are found in them, and the call runs on
the inferred template (its exact prefix and segment KV computed once per template shape)
in the request's session; a request with no contents runs dense, as it would without
KVCOMM. Afterwards the texts it carried and the reply it produced are remembered, so the
agents after it find them.
"""
from __future__ import annotations

from collections import OrderedDict


from ..plan.chat import DEFAULT_MIN_TOKENS, ChatCall, infer
from ..plan.contents import ContentIndex
from ..plan.state import AgentState, Sessions
from ..plan.template import RAW_FRAME, PromptLayout, parse_template
from .agent import build_agent


class ChatAdapter:
    """min_tokens: shortest content worth estimating; templates: template shapes whose KV is
    kept (least recently used dropped); index_bytes: remembered text (kvcomm.plan.contents)."""

    def __init__(self, engine, *, min_tokens: int = DEFAULT_MIN_TOKENS, sessions: int = 1024, templates: int = 256,
                 index_bytes: int = 64 << 20, session_bytes: int = 1 << 30):
        self.engine = engine
        self.min_tokens = int(min_tokens)
        self.index = ContentIndex(index_bytes)
        self.sessions = Sessions(sessions, session_bytes)
        self.templates = int(templates)
        self._agents: OrderedDict[str, AgentState] = OrderedDict()

    def infer(self, messages, *, tools=None, session: str | None = None, tenant: str = "") -> ChatCall:
        return infer(messages, self.engine.tokenizer, self.index, tenant, tools=tools, session=session,
                     min_tokens=self.min_tokens, specials=self.engine._special_texts)

    def call(self, messages, *, tools=None, session: str | None = None, tenant: str = "", mode: str = "kvcomm",
             **kw):
        eng = self.engine
        chat = self.infer(messages, tools=tools, session=session, tenant=tenant)
        st = self._agent(chat) if chat.template is not None and mode == "kvcomm" else self._plain(chat)
        if chat.template is None and mode == "kvcomm":
            mode = "dense"   # nothing known in it: served as without KVCOMM
        out = eng.run_in_session(self.sessions.get(f"{tenant}\0{chat.session}"), st, chat.inputs if st.template.names
                                 else {}, mode=mode, **kw)
        out.session = chat.session
        if mode == "kvcomm" or chat.template is None:
            self._remember(chat, out, tenant)
        return out

    def _remember(self, chat: ChatCall, out, tenant: str) -> None:
        for text, kind, role in chat.remember:
            self.index.add(tenant, text, kind, role, chat.session)
        reply = out.text.strip()
        if reply:
            rep = self.sessions.get(f"{tenant}\0{chat.session}").current.get(chat.agent)
            self.index.add(tenant, reply, "reply", chat.agent, chat.session, ids=rep.ids if rep else None)

    def _agent(self, chat: ChatCall) -> AgentState:
        st = self._agents.get(chat.template_key)
        if st is None:
            st = build_agent(self.engine.model, self.engine.tokenizer, self.engine.spec, chat.agent, "",
                             chat.template.text, frame=RAW_FRAME, key=chat.pool_key, template_key=chat.template_key)
            self._agents[chat.template_key] = st
            while len(self._agents) > self.templates:
                self._agents.popitem(last=False)
        self._agents.move_to_end(chat.template_key)
        return st

    @staticmethod
    def _plain(chat: ChatCall) -> AgentState:
        """An agent for a dense call over the rendered prompt (no template pass: nothing is reused)."""
        text = chat.text.replace("{", "{{").replace("}", "}}")
        return AgentState(name=chat.agent, key=chat.pool_key, system_prompt="", template=parse_template(text),
                          layout=PromptLayout(ids=[]), frame=RAW_FRAME)
