"""Model forwards over the buffer cache, and the position-neutral frame.

Everything the engine stores (bases, template segments, deltas) is in the
position-neutral frame: keys rotated back so the piece's first token sits at
position 0 (docs/method.md section 3). `neutral_keys(k, start)` is one core op call over
all layers.
"""
from __future__ import annotations

import torch

from .. import ops
from ..hf.cache import KVBufferCache


def forward(model, cache: KVBufferCache, ids: list[int], want_logits: bool = True) -> torch.Tensor | None:
    """Runs `ids` after what `cache` holds; returns the last position's logits
    (float32 [vocab]) or None. Only the last position goes through the LM head."""
    x = torch.tensor([ids], dtype=torch.long, device=cache.k.device)
    out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float() if want_logits else None


def forward_logits(model, cache: KVBufferCache, ids: list[int], rows: int) -> torch.Tensor | None:
    """Runs `ids` after what `cache` holds; float32 logits [rows, vocab] of the first `rows`
    positions (teacher forcing: row j predicts the token after ids[j]), None for 0."""
    x = torch.tensor([ids], dtype=torch.long, device=cache.k.device)
    if rows <= 0:
        model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return None
    out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=len(ids))
    return out.logits[0, :rows].float()


def neutral_keys(keys: torch.Tensor, start: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys [L,H,n,D] whose first token sits at `start`, moved to start at 0 (new tensor)."""
    return ops.rope_move(keys, inv_freq, -int(start)) if start else keys.contiguous().clone()


def neutral_pair(cache: KVBufferCache, start: int, stop: int, inv_freq: torch.Tensor):
    """Neutral-frame copies of K and V of tokens [start, stop) of `cache`."""
    k, v = cache.span(start, stop)
    return neutral_keys(k, start, inv_freq), v.contiguous().clone()
