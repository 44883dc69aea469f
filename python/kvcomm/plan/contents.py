"""Texts a server has already seen or produced, found again inside new prompts.

Agent frameworks send plain chat messages: nothing marks which parts of a prompt are shared.
What is shared is text the server has met before - a reply it generated, a task or a tool
result another agent's request carried - so the index remembers such texts (per tenant:
one tenant's text never becomes another's content) and finds every occurrence of any of them
inside a new message, also when a framework embeds it in longer text ("Agent A said: ...").

Lookup: every remembered text is filed under its first `KEY` characters; a message is scanned
once, window by window, and a window that equals some text's first characters is checked for
the whole text. A reply shorter than that ("The answer is: 2") is found only as a whole
message: frameworks pass such replies on as messages of their own, and a reply left in the
prompt as literal text would make every conversation's template a new one. Memory is bounded:
past `max_bytes` of remembered text the least recently seen texts are forgotten.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

KEY = 24   # characters a text is filed under; shorter texts are contents only as whole replies
_PRODUCERS_KEPT = 64   # conversations per text whose producers are remembered
_SAYINGS_KEPT = 16     # sayings of one text per conversation


@dataclass
class Known:
    """One remembered text."""
    text: str
    kind: str                   # "reply" (the server generated it), "user" or "tool" (a request carried it)
    producer: str               # replies: the generating agent's id; others: the message role
    session: str                # the conversation it first appeared in
    ids: tuple | None = None    # replies: the generated token ids
    producers: dict = field(default_factory=dict)   # session -> [producer, ...] in the order they said it

    def producer_in(self, session: str, occurrence: int = 0) -> str:
        """Who produced the `occurrence`-th saying of the text in `session`: agents repeat each
        other word for word ("The answer is 16.") within a conversation and across them, and a
        slot is named after the agent that said it there."""
        said = self.producers.get(session) or [self.producer]
        return said[min(occurrence, len(said) - 1)]


@dataclass
class Match:
    start: int                  # character range in the searched text
    end: int
    known: Known


class _Tenant:
    def __init__(self):
        self.texts: OrderedDict[str, Known] = OrderedDict()
        self.by_key: dict[str, list[str]] = {}
        self.short: set[str] = set()   # replies shorter than KEY: found as whole messages only
        self.bytes = 0


class ContentIndex:
    """max_bytes: memory for remembered text per index (all tenants together)."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = int(max_bytes)
        self._tenants: dict[str, _Tenant] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()   # (tenant, text), least recent first
        self.bytes = 0

    def add(self, tenant: str, text: str, kind: str, producer: str, session: str, ids=None) -> Known | None:
        """Remembers `text` (first sighting wins: its session and producer stay; who produced it in
        a later conversation is kept beside, see Known.producer_in). None when it
        is too short to be a content: shorter than KEY characters, unless it is a reply."""
        if not text or (len(text) < KEY and kind != "reply"):
            return None
        t = self._tenants.setdefault(tenant, _Tenant())
        known = t.texts.get(text)
        if known is None:
            known = t.texts[text] = Known(text, kind, producer, session, tuple(ids) if ids is not None else None,
                                          {session: [producer]})
            if len(text) < KEY:
                t.short.add(text)
            else:
                t.by_key.setdefault(text[:KEY], []).append(text)
            size = len(text.encode())
            t.bytes += size
            self.bytes += size
        else:
            if ids is not None and known.ids is None:
                known.ids = tuple(ids)
            if kind == "reply":   # said again: by whom, in which conversation
                said = known.producers.setdefault(session, [])
                if len(said) < _SAYINGS_KEPT:
                    said.append(producer)
                if len(known.producers) > _PRODUCERS_KEPT:   # bounded: the oldest conversation goes
                    known.producers.pop(next(iter(known.producers)))
        self._touch(tenant, text)
        self._evict()
        return known

    def _touch(self, tenant: str, text: str) -> None:
        self._order[(tenant, text)] = None
        self._order.move_to_end((tenant, text))

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._order:
            (tenant, text), _ = self._order.popitem(last=False)
            t = self._tenants[tenant]
            known = t.texts.pop(text, None)
            if known is None:
                continue
            if len(text) < KEY:
                t.short.discard(text)
            else:
                bucket = t.by_key.get(text[:KEY], [])
                bucket.remove(text)
                if not bucket:
                    t.by_key.pop(text[:KEY], None)
            size = len(text.encode())
            t.bytes -= size
            self.bytes -= size

    def get(self, tenant: str, text: str) -> Known | None:
        t = self._tenants.get(tenant)
        return None if t is None else t.texts.get(text)

    def find(self, tenant: str, text: str, min_chars: int = KEY) -> list[Match]:
        """Non-overlapping occurrences of remembered texts inside `text`, in order: the longest
        wins where two overlap (a reply that quotes a task is one content, not two). A short
        reply is found when `text`, edge whitespace aside, is that reply."""
        t = self._tenants.get(tenant)
        if t is None:
            return []
        bare = text.strip()
        if bare in t.short:
            at = text.index(bare)
            self._touch(tenant, bare)
            return [Match(at, at + len(bare), t.texts[bare])]
        if len(text) < KEY:
            return []
        found: list[Match] = []
        for i in range(len(text) - KEY + 1):
            for cand in t.by_key.get(text[i:i + KEY], ()):
                if len(cand) >= min_chars and text.startswith(cand, i):
                    found.append(Match(i, i + len(cand), t.texts[cand]))
        found.sort(key=lambda m: (-(m.end - m.start), m.start))
        chosen: list[Match] = []
        for m in found:
            if all(m.end <= c.start or m.start >= c.end for c in chosen):
                chosen.append(m)
                self._touch(tenant, m.known.text)
        return sorted(chosen, key=lambda m: m.start)

    def __len__(self) -> int:
        return sum(len(t.texts) for t in self._tenants.values())
