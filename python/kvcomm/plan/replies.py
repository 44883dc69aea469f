"""Which generated tokens of a reply are its content (docs/method.md, "Details").

One rule for every backend: a reply's content drops a final stop token and whitespace-only
tokens at either end. Edge whitespace would merge with the newline around a placeholder in
the next agent's prompt (one token across the slot edge), which would force that agent onto
the dense path. Generated tokens carry KV once fed back through the model: all but the last.
"""
from __future__ import annotations


class BlankTokens:
    """`is_blank(token_id)`: whether a token decodes to whitespace only (cached per id)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._cache: dict[int, bool] = {}

    def __call__(self, token_id: int) -> bool:
        blank = self._cache.get(token_id)
        if blank is None:
            blank = self._cache[token_id] = self._tok.decode([int(token_id)]).strip() == ""
        return blank


def reply_span(ids: list[int], stops, is_blank, generated: int | None = None) -> tuple[int, int, bool]:
    """(lo, hi, fed): [lo, hi) is the reply's content in the generated `ids`; `fed` says
    whether its last content token was fed back through the model (every generated token
    but the last was), so a backend that cannot run one more token knows it lacks that KV.
    generated: how many tokens were generated when `ids` are only the first of them (a
    backend that generated one more than its client sees); default len(ids)."""
    generated = len(ids) if generated is None else generated
    lo, hi = 0, len(ids)
    if hi and ids[-1] in stops:
        hi -= 1
    while hi > lo and is_blank(ids[hi - 1]):
        hi -= 1
    while lo < hi and is_blank(ids[lo]):
        lo += 1
    return lo, hi, hi > lo and hi <= generated - 1
