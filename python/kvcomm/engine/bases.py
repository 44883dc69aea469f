"""Base KV of content encoded on its own (docs/method.md section 2, section 8).

A question or tool result is encoded once per request behind a fixed header -
the chat template's opening up to the user message (BOS, and the default system
prompt if the template inserts one) followed by a lead-in that depends on the
slot kind - and the header tokens are dropped. The header's own KV is computed
once and copied in front, so an encoding costs one forward over the content only.

The content is encoded from the token ids it has inside the agent's prompt (the
span found from character offsets), never re-tokenized: base and prompt then
hold exactly the same tokens, so a moved base is exact on layer 0.

Lead-ins (documented defaults, configurable per kind):
    question  -> "The task is:\\n\\n"   ({user_question})
    condition -> "The tool result is:\\n\\n"   ({condition_<id>_current})
    reply     -> "Another agent replied:\\n\\n"   (an agent reply this engine did not
                 capture itself, e.g. text edited by the caller or a history note)
"""
from __future__ import annotations

import torch

from ..hf.cache import KVBufferCache
from .kv import forward, neutral_pair
from .template import chat_frame, tokenize

DEFAULT_LEAD_INS = {
    "question": "The task is:\n\n",
    "condition": "The tool result is:\n\n",
    "reply": "Another agent replied:\n\n",
}


class HeaderEncoder:
    """Encodes content token ids behind the fixed header of their kind."""

    def __init__(self, model, tokenizer, spec, lead_ins: dict[str, str] | None = None):
        self.model = model
        self.spec = spec
        self.lead_ins = dict(DEFAULT_LEAD_INS)
        self.lead_ins.update(lead_ins or {})
        frame = chat_frame(tokenizer, None, generation_prompt=False)
        self._headers: dict[str, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
        for kind, lead in self.lead_ins.items():
            ids, _ = tokenize(tokenizer, frame.prefix + lead, frame.add_special_tokens)
            self._headers[kind] = (ids, None, None)

    def header_ids(self, kind: str) -> list[int]:
        return self._header(kind)[0]

    def _header(self, kind: str):
        if kind not in self._headers:
            raise KeyError(f"no lead-in for content kind {kind!r} (kinds: {sorted(self._headers)})")
        ids, k, v = self._headers[kind]
        if k is None:  # header KV computed on first use, then copied in front of every content
            cache = KVBufferCache.for_spec(self.spec, len(ids))
            forward(self.model, cache, ids, want_logits=False)
            k, v = (t.clone() for t in cache.span(0, len(ids)))
            self._headers[kind] = (ids, k, v)
        return self._headers[kind]

    @torch.inference_mode()
    def encode(self, kind: str, content_ids: tuple[int, ...] | list[int]):
        """Neutral-frame (K, V) [L,H,n,D] of the content behind `kind`'s header."""
        ids, hk, hv = self._header(kind)
        h, n = len(ids), len(content_ids)
        cache = KVBufferCache.for_spec(self.spec, h + n)
        cache.k[:, :, :h].copy_(hk)
        cache.v[:, :, :h].copy_(hv)
        cache.set_length(h)
        forward(self.model, cache, list(content_ids), want_logits=False)
        return neutral_pair(cache, h, h + n, self.spec.inv_freq)
