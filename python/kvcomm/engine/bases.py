"""Base KV of content encoded on its own (docs/method.md, "Terms" and "Details"), on a
transformers model.

A content is encoded once per session behind its kind's fixed header (kvcomm.plan.headers:
the chat opening and a lead-in), and the header tokens are dropped. The header's own KV is
computed once and copied in front, so an encoding costs one forward over the content only.
The content is encoded from the token ids it has inside the agent's prompt, never
re-tokenized: base and prompt then hold exactly the same tokens, so a moved base is exact on
layer 0.
"""
from __future__ import annotations

import torch

from ..hf.cache import KVBufferCache
from ..plan.headers import header_ids, lead_ins as merge_lead_ins
from ..plan.neutral import neutral_span
from .kv import forward


class HeaderEncoder:
    """Encodes content token ids behind the fixed header of their kind."""

    def __init__(self, model, tokenizer, spec, lead_ins: dict[str, str] | None = None):
        self.model = model
        self.spec = spec
        self.lead_ins = merge_lead_ins(lead_ins)
        self._ids = header_ids(tokenizer, self.lead_ins)
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def header_ids(self, kind: str) -> list[int]:
        if kind not in self._ids:
            raise KeyError(f"no lead-in for content kind {kind!r} (kinds: {sorted(self._ids)})")
        return self._ids[kind]

    def _header_kv(self, kind: str):
        ids = self.header_ids(kind)
        if kind not in self._kv:   # computed on first use, then copied in front of every content
            cache = KVBufferCache.for_spec(self.spec, len(ids))
            forward(self.model, cache, ids, want_logits=False)
            self._kv[kind] = tuple(t.clone() for t in cache.span(0, len(ids)))
        return ids, self._kv[kind]

    @torch.inference_mode()
    def encode(self, kind: str, content_ids: tuple[int, ...] | list[int]):
        """Neutral-frame (K, V) [L,H,n,D] of the content behind `kind`'s header."""
        ids, (hk, hv) = self._header_kv(kind)
        h, n = len(ids), len(content_ids)
        cache = KVBufferCache.for_spec(self.spec, h + n)
        cache.k[:, :, :h].copy_(hk)
        cache.v[:, :, :h].copy_(hv)
        cache.set_length(h)
        forward(self.model, cache, list(content_ids), want_logits=False)
        return neutral_span(cache.k, cache.v, h, h + n, self.spec.inv_freq)
