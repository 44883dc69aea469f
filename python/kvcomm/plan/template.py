"""Agent prompt templates: parsing, rendering, and token spans from character offsets.

A template is the text of the agent's user turn with placeholders:

    {user_question}            the user's question (or task)
    {agent_<id>_current}       agent <id>'s reply in this round
    {agent_<id>_history}       agent <id>'s reply in the previous round
    {condition_<id>_current}   a tool result owned by agent <id>

`{{` and `}}` are literal braces. The full prompt is the tokenizer's chat template
applied to [system prompt, user turn], with the assistant header appended.

Spans are found by tokenizing the rendered prompt once (with offsets) and mapping
each placeholder's character range to the tokens inside it; pieces are never
tokenized on their own, since that changes the tokens at their edges. A content's
trailing whitespace that merged with the template's following text into one token
(a reply ending in a newline before the template's newline) goes with the segment,
and that token is always recomputed (`PromptLayout.merged`). Any other token that
straddles a placeholder edge makes the span unclean and the call cannot reuse
anything: `PromptLayout.problem` says where. Put placeholders after a newline to
keep edges clean.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

QUESTION, CURRENT, HISTORY, CONDITION = "user_question", "current", "history", "condition"

_AGENT_RE = re.compile(r"agent_([A-Za-z0-9_\-]+)_(current|history)")
_CONDITION_RE = re.compile(r"condition_([A-Za-z0-9_\-]+)_current")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_\-]+")
AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


# The kind of content a placeholder holds, which picks the header its base is encoded behind
# (kvcomm.plan.headers): the question, a tool result, or another agent's reply.
CONTENT_KIND = {QUESTION: "question", CONDITION: "condition", CURRENT: "reply", HISTORY: "reply"}


class TemplateError(ValueError):
    """A malformed template or bad inputs; the message names the placeholder or position."""


@dataclass(frozen=True)
class Placeholder:
    name: str               # e.g. "agent_solver_current"; also the slot name
    kind: str               # QUESTION, CURRENT, HISTORY or CONDITION
    owner: str | None       # the agent id for agent/condition slots


def classify(name: str, where: str = "") -> Placeholder:
    """Placeholder for a name, or TemplateError naming it."""
    if name == "user_question":
        return Placeholder(name, QUESTION, None)
    m = _AGENT_RE.fullmatch(name)
    if m:
        return Placeholder(name, CURRENT if m.group(2) == "current" else HISTORY, m.group(1))
    m = _CONDITION_RE.fullmatch(name)
    if m:
        return Placeholder(name, CONDITION, m.group(1))
    raise TemplateError(
        f"unknown placeholder {{{name}}}{where}: expected {{user_question}}, {{agent_<id>_current}}, "
        "{agent_<id>_history} or {condition_<id>_current}")


@dataclass(frozen=True)
class Template:
    text: str
    pieces: tuple            # str literals and Placeholder objects, in order

    @property
    def placeholders(self) -> tuple[Placeholder, ...]:
        return tuple(p for p in self.pieces if isinstance(p, Placeholder))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.placeholders)


def parse_template(text: str) -> Template:
    """Parses a template; TemplateError for unbalanced braces, empty or unknown
    names, and a placeholder used twice (one slot is one position)."""
    if not isinstance(text, str):
        raise TemplateError(f"template must be a string, got {type(text).__name__}")
    pieces: list = []
    literal: list[str] = []
    seen: set[str] = set()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "{" and text.startswith("{{", i):
            literal.append("{")
            i += 2
        elif c == "}" and text.startswith("}}", i):
            literal.append("}")
            i += 2
        elif c == "}":
            raise TemplateError(f"unbalanced '}}' at position {i} of the template (write '}}}}' for a literal brace)")
        elif c == "{":
            close = text.find("}", i + 1)
            opened = text.find("{", i + 1)
            if close < 0 or (0 <= opened < close):
                raise TemplateError(f"unbalanced '{{' at position {i} of the template (no closing '}}'; "
                                    "write '{{' for a literal brace)")
            name = text[i + 1:close]
            where = f" at position {i}"
            if not name.strip():
                raise TemplateError(f"empty placeholder name '{{}}'{where} of the template")
            if not _NAME_CHARS.fullmatch(name):
                raise TemplateError(f"bad placeholder name {{{name}}}{where}: use letters, digits, '_' or '-'")
            ph = classify(name, where)
            if name in seen:
                raise TemplateError(f"placeholder {{{name}}} appears twice in the template{where}; "
                                    "each slot may appear once")
            seen.add(name)
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(ph)
            i = close + 1
        else:
            literal.append(c)
            i += 1
    if literal:
        pieces.append("".join(literal))
    return Template(text, tuple(pieces))


def fill(template: Template, inputs: dict[str, str], agent: str = "") -> tuple[str, list[tuple[str, int, int]]]:
    """(user text, [(name, start, end)]) with every placeholder replaced by its
    input; character ranges are into the user text. TemplateError for missing,
    extra or empty inputs."""
    who = f"agent {agent!r}: " if agent else ""
    names = set(template.names)
    missing = [n for n in template.names if n not in inputs]
    if missing:
        raise TemplateError(f"{who}no input for placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    extra = sorted(set(inputs) - names)
    if extra:
        raise TemplateError(f"{who}input(s) {', '.join(extra)} match no placeholder of the template "
                            f"(placeholders: {', '.join(template.names) or 'none'})")
    out: list[str] = []
    spans: list[tuple[str, int, int]] = []
    pos = 0
    for piece in template.pieces:
        if isinstance(piece, Placeholder):
            value = inputs[piece.name]
            if not isinstance(value, str):
                raise TemplateError(f"{who}input {{{piece.name}}} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise TemplateError(f"{who}input {{{piece.name}}} is empty")
            spans.append((piece.name, pos, pos + len(value)))
            out.append(value)
            pos += len(value)
        else:
            out.append(piece)
            pos += len(piece)
    return "".join(out), spans


def special_texts(tokenizer) -> tuple[str, ...]:
    """Text forms of the tokenizer's special tokens (chat markers, BOS/EOS, ...): a content
    holding one would be tokenized into that control token and change the prompt's
    structure (end the user turn, open a new role), so inputs may not contain them."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    return tuple(sorted(t for t in found if t))


def check_inputs(template: Template, inputs, agent: str = "", specials: tuple[str, ...] = ()) -> None:
    """Every input error of one call, raised as TemplateError before anything runs:
    inputs that are not a mapping, non-string names, everything `fill` rejects (missing,
    extra, non-string or empty content), and content holding a special token's text."""
    who = f"agent {agent!r}: " if agent else ""
    if not isinstance(inputs, dict):
        raise TemplateError(f"{who}inputs must be a dict of placeholder name -> text, "
                            f"got {type(inputs).__name__}")
    for k in inputs:
        if not isinstance(k, str):
            raise TemplateError(f"{who}input names must be strings (placeholder names without braces), "
                                f"got {k!r} ({type(k).__name__})")
    fill(template, inputs, agent)
    for name in template.names:
        value = inputs[name]
        for tok in specials:
            if tok in value:
                raise TemplateError(f"{who}input {{{name}}} contains the special token {tok!r}, which "
                                    "would be tokenized as a control token and change the prompt's "
                                    "structure; remove or escape it")


def markers(template: Template) -> dict[str, str]:
    """The placeholder markers of the template pass: each placeholder's own text."""
    return {name: "{" + name + "}" for name in template.names}


# ------------------------------------------------------------------ chat rendering

_SENTINEL = "\u2063KVCOMM-USER-TURN\u2063"


@dataclass(frozen=True)
class ChatFrame:
    """The chat-formatted text around an agent's user turn: prompt = prefix + user + suffix."""
    prefix: str
    suffix: str
    add_special_tokens: bool   # whether tokenizing the prompt should add BOS etc.


# The frame of a template that is a whole rendered prompt (chat markup included), as
# templates inferred from chat messages are: nothing around it, no tokens added.
RAW_FRAME = ChatFrame("", "", False)


def chat_frame(tokenizer, system_prompt: str | None, generation_prompt: bool = True) -> ChatFrame:
    """Finds the prefix/suffix the chat template puts around a user message by
    rendering a sentinel, and checks the template inserts content verbatim."""
    def render(content: str) -> str:
        msgs = []
        if system_prompt:
            msgs.append({"role": "system", "content": system_prompt})
        msgs.append({"role": "user", "content": content})
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        # No chat template: plain text, system prompt on its own paragraph.
        return (system_prompt + "\n\n" if system_prompt else "") + content + ("\n" if generation_prompt else "")

    text = render(_SENTINEL)
    if text.count(_SENTINEL) != 1:
        raise TemplateError("the tokenizer's chat template does not insert the user message exactly once")
    prefix, suffix = text.split(_SENTINEL)
    probe = "probe text\nwith two lines"
    if render(probe) != prefix + probe + suffix:
        raise TemplateError("the tokenizer's chat template changes the user message (e.g. trims it); "
                            "kvcomm needs it inserted verbatim")
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prefix.startswith(bos))
    return ChatFrame(prefix, suffix, add_special)


# ------------------------------------------------------------------ token spans

@dataclass
class PromptLayout:
    """Token layout of one rendered prompt: S0 {P1} S1 ... {Pn} Sn.

    spans[i] = (name, start, stop) token range of placeholder i; segments[i] =
    (start, stop) of the text after it up to the next placeholder, the last one
    ending before the prompt's last token (which is always run through the model).
    s0 = tokens before the first placeholder (all but the last token if none).
    `merged`: segment positions whose token took in a content's trailing whitespace (the
    first token of the segment after it); every call computes them.
    `problem` is set when a placeholder edge falls inside a token otherwise.
    """
    ids: list[int]
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    segments: list[tuple[int, int]] = field(default_factory=list)
    s0: int = 0
    problem: str | None = None
    merged: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.ids)

    def span_ids(self, i: int) -> tuple[int, ...]:
        _, a, b = self.spans[i]
        return tuple(self.ids[a:b])

    def segment_ids(self, i: int) -> tuple[int, ...]:
        a, b = self.segments[i]
        return tuple(self.ids[a:b])


def tokenize(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def layout(ids: list[int], offsets: list[tuple[int, int]],
           char_spans: list[tuple[str, int, int]], text: str | None = None) -> PromptLayout:
    """Token spans of the placeholders whose character ranges are `char_spans`
    (into the tokenized `text`), from the tokenizer's offsets.

    A token across a content's end whose part inside the content is whitespace only (a
    reply ending in a newline, followed by the template's own newline: one "\n\n" token)
    is given to the segment after the content and listed in `merged`: the content is the
    tokens before it, and the segment's first token differs from the template's, so every
    call recomputes it (needs `text`). Any other token across a content edge is a problem."""
    out = PromptLayout(ids=list(ids))
    T = len(ids)
    if T < 2:
        out.problem = "prompt has fewer than 2 tokens"
        return out
    prev_end = 0
    for name, c0, c1 in char_spans:
        first = last = None
        for t, (s, e) in enumerate(offsets):
            if e <= s:          # zero-width (added special tokens): belongs to no text
                continue
            if s < c1 < e and not s < c0 and text is not None and not text[s:c1].strip():
                out.merged.append(t)   # trailing whitespace merged into the segment's first token
                continue
            if s < c0 < e or s < c1 < e:
                piece = "start" if s < c0 < e else "end"
                out.problem = (f"boundary token merge at slot {name}: token {t} spans the {piece} of the "
                               "content (it merged with the neighbouring text)")
                return out
            if s >= c0 and e <= c1:
                if first is None:
                    first = t
                last = t
        if first is None:
            out.problem = f"slot {name}: no token lies inside the content"
            return out
        if first < prev_end:
            out.problem = f"slot {name}: overlaps the previous placeholder"
            return out
        out.spans.append((name, first, last + 1))
        prev_end = last + 1
    if out.spans and out.spans[-1][2] >= T:
        out.problem = f"slot {out.spans[-1][0]}: the prompt ends inside the content"
        return out
    if any(m >= T - 1 for m in out.merged):
        out.problem = "the prompt's last token merged with a content's trailing whitespace"
        return out
    out.s0 = out.spans[0][1] if out.spans else T - 1
    for i, (_, _, stop) in enumerate(out.spans):
        nxt = out.spans[i + 1][1] if i + 1 < len(out.spans) else T - 1
        out.segments.append((stop, nxt))
    return out


def render_layout(tokenizer, frame: ChatFrame, user_text: str,
                  char_spans: list[tuple[str, int, int]]) -> PromptLayout:
    """Tokenizes prefix + user_text + suffix once and locates the placeholders."""
    text = frame.prefix + user_text + frame.suffix
    ids, offsets = tokenize(tokenizer, text, frame.add_special_tokens)
    shift = len(frame.prefix)
    return layout(ids, offsets, [(n, a + shift, b + shift) for n, a, b in char_spans], text)
