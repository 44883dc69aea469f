"""A transformers Cache over the first `length` tokens of a KVBufferCache that writes each
forward's new tokens at given positions (`pos`, an int64 tensor), in place.

Two forwards use it: the reuse path's scattered forward (scatter.py: the recomputed tokens at
arbitrary positions) and the captured last-token step (static_step.py: one token at a
position held in a persistent tensor, so a CUDA graph can replay it)."""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..hf.cache import KVBufferCache


class PositionedLayer(CacheLayerMixin):
    """One layer's view [1, H, length, D] of the buffer; update() writes the new tokens at `pos`."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, compileable: bool):
        super().__init__()
        self.keys, self.values, self.pos = keys, values, pos
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.is_compileable = compileable

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffer exists already
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.pos, key_states)
        self.values.index_copy_(2, self.pos, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


class PositionedCache(Cache):
    """Every layer of `buffer` as a PositionedLayer over its first `length` tokens.
    compileable: whether torch.compile / graph capture may treat it as static (the
    one-token step) or not (the scattered forward, whose shapes vary per call)."""

    def __init__(self, buffer: KVBufferCache, length: int, pos: torch.Tensor, *, compileable: bool):
        super().__init__(layers=[
            PositionedLayer(buffer.k[i, :, :length].unsqueeze(0), buffer.v[i, :, :length].unsqueeze(0), pos,
                            compileable)
            for i in range(buffer.k.shape[0])])
