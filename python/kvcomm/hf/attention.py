"""The "kvcomm" attention implementation registered with transformers.

Attention itself is ordinary scaled-dot-product attention: KVCOMM changes what is
in the cache (estimated KV materialised by the core before the forward), not how
a query attends to it. What this implementation adds is the check that makes the
reuse path safe: the keys it is handed must cover every position before the
query, so a cache that was assembled with a gap or an overlap fails loudly
instead of attending to garbage.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvcomm"


def kvcomm_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    if key.shape[-2] < query.shape[-2]:
        raise RuntimeError(
            f"kvcomm attention: {key.shape[-2]} cached keys for {query.shape[-2]} queries in layer "
            f"{getattr(module, 'layer_idx', '?')}; the assembled cache is shorter than the prompt")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_registered = False


def register() -> None:
    """Registers the attention function and its mask (the SDPA one) under "kvcomm"."""
    global _registered
    if _registered:
        return
    AttentionInterface.register(NAME, kvcomm_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True
