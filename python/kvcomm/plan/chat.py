"""The layout of a plain chat request, inferred: agent, contents, slots, session.

Agent frameworks call a chat endpoint with a list of messages and nothing that marks what is
shared. The method applies once the layout is found (docs/method.md, "Plain chat traffic"):

- the prompt is the chat template applied to the messages (with the generation prompt),
  exactly as the server renders it;
- **contents** are spans of it that equal text the server has met before (kvcomm.plan.contents:
  replies it generated, user and tool messages earlier requests carried), at least
  `min_tokens` long (default: any length), also inside longer messages; a reply shorter
  than the index's key is found as a whole message;
- **slots** name each content by its role, stable across requests so anchors accumulate:
  the first user text is `{user_question}`; a reply of agent P is `{agent_P_current}` (its
  latest in this prompt; the one before `{agent_P_history}`, older ones `{agent_P-<k>_current}`),
  P being the agent that said it in this conversation (agents repeat each other word for
  word: the k-th saying of a text in the prompt is its k-th producer's);
  other user texts `{condition_user-<k>_current}`, tool results `{condition_tool-<k>_current}`;
- the **agent** is what stays the same across one role's requests and differs between roles:
  its system messages and tool definitions. Its pool identity is stable; the template - the
  prompt with every content replaced by its placeholder - changes as the conversation grows,
  and a backend keeps the template's exact prefix and segment KV per template;
- the **session** is given (a header, the `user` field) or inferred: the conversation most of
  the request's contents first appeared in; a request without contents starts one.

A request in which nothing is found gets no layout (`infer` returns a ChatCall without
spans): the backend serves it as it would without KVCOMM.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field

from .contents import KEY, ContentIndex, Match
from .template import RAW_FRAME, Template, TemplateError, parse_template, render_layout

# Every content found is a slot by default: a short one left in the prompt as literal text
# ("The answer is: 2") would make the template of each conversation a new one, and a template
# seen for the first time is served plainly while its pass runs; estimating it costs little.
DEFAULT_MIN_TOKENS = 1


class ChatError(ValueError):
    """Messages kvcomm cannot lay out (the backend serves them plainly); the message says why."""


@dataclass
class ChatCall:
    agent: str                   # the requesting agent's id ("a" + hash of its system messages and tools)
    pool_key: str                # its identity in the anchor pool
    system: str                  # its system messages, joined
    text: str                    # the rendered prompt
    template: Template | None    # the prompt with each content replaced by its placeholder
    spans: tuple = ()            # (slot, start, end) character ranges of the contents in `text`
    session: str = ""
    matches: list = field(default_factory=list)      # the contents' index entries, in order
    remember: list = field(default_factory=list)     # (text, kind, role) of this request to index afterwards

    @property
    def inputs(self) -> dict[str, str]:
        return {name: self.text[a:b] for name, a, b in self.spans}

    @property
    def template_key(self) -> str:
        digest = hashlib.sha1(self.template.text.encode()).hexdigest()[:12] if self.template else "none"
        return f"{self.pool_key}/{digest}"


def message_text(m: dict) -> str:
    """A message's text: a string, or the text parts of a content list. ChatError otherwise."""
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
        return "".join(str(p.get("text", "")) for p in c)
    raise ChatError("a message holds non-text content parts")


def agent_identity(messages: list[dict], tools) -> tuple[str, str]:
    """(agent id, system text): the same for every request of one role."""
    system = "\n".join(message_text(m) for m in messages if m.get("role") in ("system", "developer"))
    tools_text = json.dumps(tools, sort_keys=True) if tools else ""
    digest = hashlib.sha1(f"{system}\0{tools_text}".encode()).hexdigest()[:8]
    return f"a{digest}", system


def _slot_names(found: list[tuple[int, Match]], roles: list[str], session: str) -> list[str]:
    """A placeholder name per content, by role (a reply: by who produced it in `session`), in
    prompt order."""
    names: list[str] = []
    replies: dict[str, list[int]] = {}
    sayings: dict[str, int] = {}   # occurrences of each reply text so far in this prompt
    users = tools = 0
    for i, (mi, m) in enumerate(found):
        k = m.known
        if k.kind == "reply":
            nth = sayings[k.text] = sayings.get(k.text, -1) + 1
            replies.setdefault(k.producer_in(session, nth), []).append(i)
            names.append("")
        elif roles[mi] == "tool" or k.kind == "tool":
            tools += 1
            names.append(f"condition_tool-{tools}_current")
        elif "user_question" not in names:
            names.append("user_question")
        else:
            users += 1
            names.append(f"condition_user-{users}_current")
    for producer, idx in replies.items():
        for j, i in enumerate(reversed(idx)):   # the latest reply first
            names[i] = (f"agent_{producer}_current" if j == 0 else f"agent_{producer}_history" if j == 1
                        else f"agent_{producer}-{j}_current")
    return names


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def infer(messages: list[dict], tokenizer, index: ContentIndex, tenant: str, *, tools=None,
          session: str | None = None, min_tokens: int = DEFAULT_MIN_TOKENS, specials: tuple[str, ...] = ()
          ) -> ChatCall:
    """The layout of a chat request (see the module docstring). ChatError when the messages
    cannot be laid out (non-text parts, a chat template that does not insert them verbatim)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ChatError("messages must be a non-empty list of objects")
    bodies = [message_text(m) for m in messages]   # ChatError before anything renders
    messages = [dict(m, content=b) for m, b in zip(messages, bodies)]
    agent, system = agent_identity(messages, tools)
    kwargs = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    # Each message's text inside the rendered prompt, in order.
    where, pos, roles = [], 0, []
    for m, body in zip(messages, bodies):
        at = text.find(body, pos) if body else pos
        if at < 0:
            raise ChatError(f"the chat template does not insert a {m.get('role')} message verbatim")
        where.append((at, body))
        roles.append(str(m.get("role")))
        pos = at + len(body)
    found: list[tuple[int, Match]] = []
    remember = []
    for mi, (m, (at, body)) in enumerate(zip(messages, where)):
        role = roles[mi]
        if role in ("system", "developer") or not body:
            continue
        hits = [h for h in index.find(tenant, body) if not any(s in h.known.text for s in specials)]
        found += [(mi, Match(at + h.start, at + h.end, h.known)) for h in hits]
        if not any(h.start == 0 and h.end == len(body) for h in hits) and role in ("user", "tool"):
            remember.append((body.strip(), "tool" if role == "tool" else "user", role))
    sid = session or _session_of([m for _, m in found]) or uuid.uuid4().hex
    call = ChatCall(agent=agent, pool_key=f"{agent}@chat", system=system, text=text, template=None,
                    session=sid, remember=remember)
    spans, kept = _spans(text, found, roles, sid, tokenizer, min_tokens)
    if spans:
        pieces, last = [], 0
        for name, a, b in spans:
            pieces += [_escape(text[last:a]), "{" + name + "}"]
            last = b
        pieces.append(_escape(text[last:]))
        try:
            call.template = parse_template("".join(pieces))
        except TemplateError as e:   # a name the grammar refuses: serve it plainly
            raise ChatError(f"inferred template: {e}") from None
        call.spans, call.matches = tuple(spans), kept
    return call


def _session_of(matches: list[Match]) -> str | None:
    """The conversation most contents first appeared in (ties: the first content's). Short
    replies vote only when nothing longer was found: two conversations may share one."""
    long = [m for m in matches if len(m.known.text) >= KEY]
    matches = long or matches
    counts: dict[str, int] = {}
    for m in matches:
        counts[m.known.session] = counts.get(m.known.session, 0) + 1
    return max(counts, key=lambda s: (counts[s], -[m.known.session for m in matches].index(s))) if counts else None


def _spans(text: str, found, roles, session: str, tokenizer, min_tokens: int):
    """Slot spans of the contents that are at least min_tokens long in the rendered prompt."""
    found = sorted(found, key=lambda x: x[1].start)
    while True:
        names = _slot_names(found, roles, session)
        # A content glued to the text before it by a space ("Agent A said: <reply>") takes the
        # space in: byte-pair tokenizers merge a space with the word after it.
        spans = [(n, m.start - 1 if m.start > 0 and text[m.start - 1] == " " else m.start, m.end)
                 for n, (_, m) in zip(names, found)]
        if not spans:
            return [], []
        lay = render_layout(tokenizer, RAW_FRAME, text, spans)
        if lay.problem is None:
            short = {i for i, (_, a, b) in enumerate(lay.spans) if b - a < min_tokens}
        else:   # a content edge inside a token (text glued to it): drop the offending content
            short = {next((i for i, (n, _, _) in enumerate(spans) if f"slot {n}" in lay.problem), 0)}
        if not short:
            return spans, [m.known for _, m in found]
        found = [f for i, f in enumerate(found) if i not in short]
