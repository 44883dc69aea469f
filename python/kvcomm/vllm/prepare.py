"""Turning a validated KVCOMM call into what the engine needs: token layout, internal requests.

The front end (frontend.py) uses this inside the OpenAI server; tests and offline
drivers use it with vLLM's LLM class. Layouts come from the planner's template code
(kvcomm.plan.template), so a call is laid out exactly as KVCommEngine lays it out.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan.headers import header_ids, lead_ins as merge_lead_ins
from ..plan.state import agent_key
from ..plan.template import (CONTENT_KIND, RAW_FRAME, PromptLayout, chat_frame, classify, fill, markers, render_layout,
                             special_texts)
from .protocol import KEY, SERVER, Call, ids_digest


@dataclass
class Internal:
    """An internal one-token request: prompt ids and the KVCOMM server fields."""
    ids: list
    server: dict
    key: tuple     # identity for de-duplication


@dataclass
class Prepared:
    lay: PromptLayout
    agent_key: str
    template: Internal
    encodes: list            # Internal, one per content that needs a base encoding
    replies: list            # (slot, owner, round, ids): contents the engine may hold as captured replies
    server: dict             # the call's _server fields (without the token)
    exact_prefix: int = 0    # leading prompt tokens equal to the agent's S0 (what a dense call loads)


class Preparer:
    """tokenizer: the served model's; lead_ins: header lead-in per content kind."""

    def __init__(self, tokenizer, lead_ins: dict | None = None):
        self.tok = tokenizer
        self.specials = special_texts(tokenizer)
        self.lead_ins = merge_lead_ins(lead_ins)
        self.headers = header_ids(tokenizer, self.lead_ins)

    def encode_job(self, session: str, kind: str, ids, slot: str = "") -> Internal:
        """The internal request that encodes content `ids` of `kind` behind its header, once per
        session and content."""
        ids = tuple(int(t) for t in ids)
        header = self.headers[kind]
        return Internal(list(header) + list(ids), {
            "op": "encode", "session": session, "slot": slot, "kind": kind, "header": len(header),
            "content_ids": list(ids)}, (session, kind, ids))

    def prepare(self, call: Call) -> Prepared:
        frame = RAW_FRAME if call.raw else chat_frame(self.tok, call.system or None)
        lay = render_layout(self.tok, frame, call.user_text, list(call.spans))
        key = call.template_key or agent_key(call.agent, call.system, call.template.text)
        # The template pass: the prompt with the placeholder markers in place.
        m_user, m_spans = fill(call.template, markers(call.template), call.agent)
        m_lay = render_layout(self.tok, frame, m_user, m_spans)
        template = Internal(list(m_lay.ids), {
            "op": "template", "agent": call.agent, "agent_key": key, "pool_key": call.pool_key or key,
            "system": call.system, "raw": call.raw,
            "template": call.template.text, "ids_list": list(m_lay.ids), "spans": [list(s) for s in m_lay.spans],
            "segments": [list(s) for s in m_lay.segments], "s0": m_lay.s0, "problem": m_lay.problem}, ("agent", key))
        encodes, replies = [], []
        if not lay.problem:
            for name, a, b in lay.spans:
                ph = classify(name)
                kind = CONTENT_KIND[ph.kind]
                ids = tuple(lay.ids[a:b])
                if kind == "reply":
                    rnd = call.round if ph.kind == "current" else call.round - 1
                    replies.append((name, ph.owner, rnd, ids))
                encodes.append(self.encode_job(call.session, kind, ids, name))
        server = {"op": "call", "agent": call.agent, "agent_key": key, "session": call.session,
                  "round": call.round, "learn": call.learn, "ids": ids_digest(lay.ids), "n": lay.length,
                  "spans": [list(s) for s in lay.spans], "segments": [list(s) for s in lay.segments],
                  "s0": lay.s0, "problem": lay.problem, "merged": list(lay.merged)}
        exact = 0
        if not m_lay.problem:
            limit = min(m_lay.s0, lay.length - 1)
            while exact < limit and lay.ids[exact] == m_lay.ids[exact]:
                exact += 1
        return Prepared(lay, key, template, encodes, replies, server, exact)


def kv_params(server: dict, token: str) -> dict:
    """kv_transfer_params of an internal request."""
    return {KEY: {SERVER: dict(server, token=token)}}
