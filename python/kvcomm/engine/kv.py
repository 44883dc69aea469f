"""Model forwards over the buffer cache (the transformers backend's side of the planner's
buffers: `cache.k` / `cache.v` are [layers, kv_heads, capacity, head_dim])."""
from __future__ import annotations

import torch

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
