"""The KVCOMM request parameters of the vLLM server, and their validation.

A client marks a chat-completion request as one KVCOMM agent call by putting this
under the request's `kv_transfer_params` (vLLM's per-request field for KV connectors):

    "kv_transfer_params": {"kvcomm": {
        "agent": "solver",                       # the agent's name
        "template": "Problem:\\n{user_question}\\n\\nSolve it.",   # its user-turn template
        "slots": {"user_question": [9, 31]},     # character span [start, end) of each
                                                 # placeholder's content in the user message
        "session": "q17",                        # the multi-agent request this call belongs to
        "round": 0,                              # optional: the round within the session
        "learn": true                            # optional: false leaves the anchor pool as it
                                                 # is (no new anchors, deltas or credit)
    }}

The messages must be an optional system message followed by one user message whose
text is the template with every placeholder replaced by the content at its span. The
system prompt and the template together identify the agent (its pool identity, exact
prefix and template KV). Everything else in the request (sampling, max_tokens,
streaming) is ordinary OpenAI / vLLM.

`parse_call` checks all of it and raises ParamError, whose message the server returns
with HTTP 400. The server then adds its own fields under "_server" (see frontend.py);
a client may not send keys starting with "_" nor an "op".
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..plan.template import AGENT_NAME_RE, Template, TemplateError, parse_template

KEY = "kvcomm"            # the key under kv_transfer_params
SERVER = "_server"        # fields only the server's front end may set
OPS = ("template", "encode", "save")   # internal requests the front end sends to the engine
SESSION_MAX = 256         # characters of a session id
TEMPLATE_MAX = 65536      # characters of a template


class ParamError(ValueError):
    """Bad KVCOMM parameters in a request; the message says which field and why."""


@dataclass(frozen=True)
class Call:
    """One validated KVCOMM agent call."""
    agent: str
    template: Template
    system: str
    user_text: str
    spans: tuple[tuple[str, int, int], ...]   # (slot, start, end) in user_text, template order
    session: str
    round: int
    learn: bool = True
    # A call laid out from plain chat messages (kvcomm.plan.chat): the template is the whole
    # rendered prompt (no chat frame around it), its pool identity is the agent's, and the
    # template's own identity is its shape.
    raw: bool = False
    pool_key: str | None = None
    template_key: str | None = None

    @property
    def inputs(self) -> dict[str, str]:
        return {name: self.user_text[a:b] for name, a, b in self.spans}


def _type_name(x) -> str:
    return "null" if x is None else type(x).__name__


def _messages(body: dict) -> tuple[str, str]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ParamError("kvcomm: a KVCOMM call needs 'messages': [optional system message, one user message]")
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
    if roles not in (["user"], ["system", "user"]):
        raise ParamError(f"kvcomm: messages must be [system, user] or [user] for a KVCOMM call, got roles {roles}")
    texts = []
    for m in msgs:
        c = m.get("content")
        if not isinstance(c, str):
            raise ParamError(f"kvcomm: the {m['role']} message content must be a string for a KVCOMM call, "
                             f"got {_type_name(c)}")
        texts.append(c)
    return (texts[0] if len(texts) == 2 else ""), texts[-1]


def _int(name: str, x, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ParamError(f"kvcomm: {name} must be an integer, got {_type_name(x)} {x!r}")
    if x < lo:
        raise ParamError(f"kvcomm: {name} must be >= {lo}, got {x}")
    return x


def _spans(raw, template: Template, user_text: str) -> tuple[tuple[str, int, int], ...]:
    if not isinstance(raw, dict):
        raise ParamError(f"kvcomm: slots must be an object of placeholder name -> [start, end], got {_type_name(raw)}")
    names = template.names
    for name in raw:
        if name not in names:
            raise ParamError(f"kvcomm: unknown slot {name!r}: the template's placeholders are "
                             f"{', '.join(names) or 'none'}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ParamError(f"kvcomm: no span for placeholder(s) {', '.join(missing)} of the template")
    n = len(user_text)
    out = []
    for name in names:
        span = raw[name]
        if not isinstance(span, (list, tuple)) or len(span) != 2:
            raise ParamError(f"kvcomm: slots.{name} must be [start, end], got {_type_name(span)} {span!r}")
        a = _int(f"slots.{name}[0]", span[0])
        b = _int(f"slots.{name}[1]", span[1])
        if not a < b <= n:
            raise ParamError(f"kvcomm: slots.{name} = [{a}, {b}] is outside the user message of {n} characters "
                             "(need 0 <= start < end <= length)")
        out.append((name, a, b))
    # The user message must be the template filled at exactly these spans: the text
    # between spans is the template's own literal text, in order.
    pos = 0
    it = iter(out)
    for piece in template.pieces:
        if isinstance(piece, str):
            if user_text[pos:pos + len(piece)] != piece:
                raise ParamError(f"kvcomm: the user message differs from the template at character {pos} "
                                 f"(expected the template text {piece[:40]!r})")
            pos += len(piece)
        else:
            name, a, b = next(it)
            if a != pos:
                raise ParamError(f"kvcomm: slots.{name} starts at {a}, but the template puts {{{name}}} at "
                                 f"character {pos} of the user message")
            pos = b
    if pos != len(user_text):
        raise ParamError(f"kvcomm: the user message has {len(user_text) - pos} characters after the end of the "
                         "template")
    return tuple(out)


def kvcomm_params(body: dict) -> dict | None:
    """The body's kv_transfer_params["kvcomm"], None when absent (a plain request)."""
    ktp = body.get("kv_transfer_params")
    if ktp is None:
        return None
    if not isinstance(ktp, dict):
        raise ParamError(f"kv_transfer_params must be an object, got {_type_name(ktp)}")
    if KEY not in ktp:
        return None
    params = ktp[KEY]
    if not isinstance(params, dict):
        raise ParamError(f"kvcomm: kv_transfer_params.kvcomm must be an object, got {_type_name(params)}")
    return params


def parse_call(body: dict, specials: tuple[str, ...] = ()) -> Call:
    """Validates a chat-completion body carrying KVCOMM parameters; ParamError otherwise."""
    p = kvcomm_params(body)
    if p is None:
        raise ParamError("kvcomm: no kv_transfer_params.kvcomm in the request")
    for k in p:
        if not isinstance(k, str) or k.startswith("_") or k == "op":
            raise ParamError(f"kvcomm: {k!r} may only be set by the server")
    known = {"agent", "template", "slots", "session", "round", "learn"}
    extra = sorted(set(p) - known)
    if extra:
        raise ParamError(f"kvcomm: unknown field(s) {', '.join(extra)} (fields: {', '.join(sorted(known))})")
    agent = p.get("agent")
    if not isinstance(agent, str) or not AGENT_NAME_RE.fullmatch(agent):
        raise ParamError(f"kvcomm: agent must be a name of letters, digits, '_' or '-', got {_type_name(agent)} "
                         f"{agent!r}")
    text = p.get("template")
    if not isinstance(text, str):
        raise ParamError(f"kvcomm: template must be a string, got {_type_name(text)}")
    if len(text) > TEMPLATE_MAX:
        raise ParamError(f"kvcomm: template longer than {TEMPLATE_MAX} characters")
    try:
        template = parse_template(text)
    except TemplateError as e:
        raise ParamError(f"kvcomm: template: {e}") from None
    session = p.get("session")
    if not isinstance(session, str) or not session or len(session) > SESSION_MAX:
        raise ParamError(f"kvcomm: session must be a non-empty string of at most {SESSION_MAX} characters, got "
                         f"{_type_name(session)}")
    rnd = _int("round", p.get("round", 0))
    learn = p.get("learn", True)
    if not isinstance(learn, bool):
        raise ParamError(f"kvcomm: learn must be true or false, got {_type_name(learn)} {learn!r}")
    system, user = _messages(body)
    spans = _spans(p.get("slots"), template, user)
    for name, a, b in spans:
        content = user[a:b]
        if not content.strip():
            raise ParamError(f"kvcomm: the content of slot {name} is empty or whitespace")
        for tok in specials:
            if tok in content:
                raise ParamError(f"kvcomm: the content of slot {name} contains the special token {tok!r}")
    if body.get("n", 1) not in (1, None):
        raise ParamError("kvcomm: a KVCOMM call generates one choice (n must be 1)")
    return Call(agent=agent, template=template, system=system, user_text=user, spans=spans,
                session=session, round=rnd, learn=learn)


def ids_digest(ids) -> str:
    """A short fingerprint of token ids: the server's front end and the engine compare
    the prompt they each see by it."""
    return hashlib.sha1(json.dumps([int(t) for t in ids]).encode()).hexdigest()[:16]
