"""The position-neutral frame (docs/method.md, "Keys move exactly").

Everything the planner stores (content bases, template segments, deltas) is in the
position-neutral frame: keys rotated back so the piece's first token sits at position 0.
Buffers are [layers, kv_heads, tokens, head_dim], indexed by absolute prompt position.
"""
from __future__ import annotations

import torch

from .. import ops


def neutral_keys(keys: torch.Tensor, start: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys [L,H,n,D] whose first token sits at `start`, moved to start at 0 (new tensor)."""
    return ops.rope_move(keys, inv_freq, -int(start)) if start else keys.contiguous().clone()


def neutral_span(k: torch.Tensor, v: torch.Tensor, start: int, stop: int, inv_freq: torch.Tensor,
                 offset: int = 0):
    """Neutral-frame copies of K and V of tokens [start, stop) of buffers whose index 0 holds
    absolute position `offset` (0: absolute-position buffers)."""
    a, b = start - offset, stop - offset
    return neutral_keys(k[:, :, a:b], start, inv_freq), v[:, :, a:b].contiguous().clone()
