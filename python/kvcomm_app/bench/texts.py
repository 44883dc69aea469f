"""Synthetic text of an exact number of tokens, for benchmark prompts and forced replies.

A text is a sequence of words each of which is one token on its own ("word") and
after a space (" word"), so n words are n tokens. Every text is checked to round-trip
(tokenize -> the same ids -> decode -> the same text): the engine finds a slot's
tokens by tokenizing the whole prompt, and a reply is reused from its sender's cache
only when the receiving prompt holds exactly the reply's token ids.
"""
from __future__ import annotations

import random

# Common English words; those that are not single tokens in a given tokenizer are
# dropped. Single letters come last as the fallback for byte-level test tokenizers.
WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education"
).split() + list("abcdefghijklmnopqrstuvwxyz")


class TextMaker:
    """Makes texts of exactly n tokens for one tokenizer."""

    def __init__(self, tokenizer, min_words: int = 8):
        self.tokenizer = tokenizer
        self.words = [w for w in WORDS if self._one_token(w) and self._one_token(" " + w)]
        if len(self.words) < min_words:
            raise RuntimeError(
                f"kvcomm bench: the tokenizer ({type(tokenizer).__name__}) has only {len(self.words)} of the "
                f"benchmark's filler words as single tokens; at least {min_words} are needed")

    def _one_token(self, text: str) -> bool:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) == 1

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def make(self, n: int, rng: random.Random, attempts: int = 5) -> tuple[str, list[int]]:
        """(text, token ids) with len(ids) == n and a clean round trip."""
        if n < 1:
            raise ValueError(f"a text needs at least 1 token, got {n}")
        for _ in range(attempts):
            text = " ".join(rng.choice(self.words) for _ in range(n))
            ids = self.ids(text)
            if len(ids) == n and self.tokenizer.decode(ids) == text:
                return text, ids
        raise RuntimeError(f"kvcomm bench: could not make a {n}-token text that round-trips through "
                           f"{type(self.tokenizer).__name__}")

    def words_text(self, n: int, rng: random.Random) -> str:
        """n filler words (n tokens after a space), for padding a system prompt."""
        return " ".join(rng.choice(self.words) for _ in range(n))
