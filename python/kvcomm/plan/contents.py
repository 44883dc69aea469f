"""Texts a server has already seen or produced, found again inside new prompts.

Agent frameworks send plain chat messages: nothing marks which parts of a prompt are shared.
What is shared is text the server has met before - a reply it generated, a task or a tool
result another agent's request carried - so the index remembers such texts (per tenant:
one tenant's text never becomes another's content) and finds every occurrence of any of them
inside a new message, also when a framework embeds it in longer text ("Agent A said: ...").

Lookup: every remembered text is filed under its first `KEY` characters; a message is scanned
once, window by window, and a window that equals some text's first characters is checked for
the whole text. Memory is bounded: past `max_bytes` of remembered text the least recently
seen texts are forgotten.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

KEY = 24   # characters a text is filed under; texts shorter than this are never contents


@dataclass
class Known:
    """One remembered text."""
    text: str
    kind: str                   # "reply" (the server generated it), "user" or "tool" (a request carried it)
    producer: str               # replies: the generating agent's id; others: the message role
    session: str                # the conversation it first appeared in
    ids: tuple | None = None    # replies: the generated token ids


@dataclass
class Match:
    start: int                  # character range in the searched text
    end: int
    known: Known


class _Tenant:
    def __init__(self):
        self.texts: OrderedDict[str, Known] = OrderedDict()
        self.by_key: dict[str, list[str]] = {}
        self.bytes = 0


class ContentIndex:
    """max_bytes: memory for remembered text per index (all tenants together)."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = int(max_bytes)
        self._tenants: dict[str, _Tenant] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()   # (tenant, text), least recent first
        self.bytes = 0

    def add(self, tenant: str, text: str, kind: str, producer: str, session: str, ids=None) -> Known | None:
        """Remembers `text` (first sighting wins: its session and producer stay). None when it
        is too short to be a content."""
        if len(text) < KEY:
            return None
        t = self._tenants.setdefault(tenant, _Tenant())
        known = t.texts.get(text)
        if known is None:
            known = t.texts[text] = Known(text, kind, producer, session, tuple(ids) if ids is not None else None)
            t.by_key.setdefault(text[:KEY], []).append(text)
            size = len(text.encode())
            t.bytes += size
            self.bytes += size
        elif ids is not None and known.ids is None:
            known.ids = tuple(ids)
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
        wins where two overlap (a reply that quotes a task is one content, not two)."""
        t = self._tenants.get(tenant)
        if t is None or len(text) < KEY:
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
