"""A transformers Cache whose layers are views of one [layers, kv_heads, T, head_dim] buffer.

This is what lets the engine work on all layers at once: the core writes the
estimated KV of a slot straight into `cache.k[:, :, a:b]` / `cache.v[:, :, a:b]`
(one op call covers every layer), the exact prefix is one copy, and after a dense
prefill the real KV of any span of the prompt is a strided view, again for all
layers at once. transformers sees an ordinary growing cache (like DynamicCache):
each layer's `update` writes the new tokens in place and returns the views.
Batch size is 1.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _BufferLayer(DynamicLayer):
    """One layer's slice of the shared buffer; `length` tokens are valid."""

    def __init__(self, owner: "KVBufferCache", index: int):
        super().__init__()
        self.owner = owner
        self.index = index
        self.length = 0
        self.dtype, self.device = owner.k.dtype, owner.k.device
        self.is_initialized = True
        self.refresh()

    def refresh(self) -> None:
        # [1, H, length, D] views; the batch dimension is a free unsqueeze.
        self.keys = self.owner.k[self.index, :, : self.length].unsqueeze(0)
        self.values = self.owner.v[self.index, :, : self.length].unsqueeze(0)

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffer exists already
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(f"KVBufferCache holds one sequence; got batch size {key_states.shape[0]}")
        start, count = self.length, key_states.shape[-2]
        self.owner.ensure_capacity(start + count)
        self.owner.k[self.index, :, start:start + count].copy_(key_states[0])
        self.owner.v[self.index, :, start:start + count].copy_(value_states[0])
        self.length = start + count
        self.refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # legacy meaning: the length to keep
            self.length = min(self.length, tokens_to_remove)
        elif tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
        self.refresh()

    def reset(self) -> None:
        self.length = 0
        self.refresh()


class KVBufferCache(Cache):
    """Cache over preallocated K/V buffers `k`, `v` of shape [L, H, capacity, D].

    Grows (by copying) if a forward needs more than `capacity` tokens; views taken
    before a growth then point at the old buffer, so the engine sizes it up front.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.k = torch.empty(num_layers, kv_heads, max(capacity, 1), head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        super().__init__(layers=[_BufferLayer(self, i) for i in range(num_layers)])

    @classmethod
    def for_spec(cls, spec, capacity: int) -> "KVBufferCache":
        return cls(spec.num_layers, spec.kv_heads, spec.head_dim, capacity, spec.dtype, spec.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def length(self) -> int:
        return min(layer.length for layer in self.layers)

    def set_length(self, n: int) -> None:
        """Declares the first n tokens of every layer valid (after writing them directly)."""
        if not 0 <= n <= self.capacity:
            raise ValueError(f"KVBufferCache.set_length: {n} outside [0, {self.capacity}]")
        for layer in self.layers:
            layer.length = n
            layer.refresh()

    def ensure_capacity(self, n: int) -> None:
        if n <= self.capacity:
            return
        new_cap = max(n, 2 * self.capacity)
        L, H, _, D = self.k.shape
        k = torch.empty(L, H, new_cap, D, dtype=self.k.dtype, device=self.k.device)
        v = torch.empty_like(k)
        k[:, :, : self.capacity].copy_(self.k)
        v[:, :, : self.capacity].copy_(self.v)
        self.k, self.v = k, v
        for layer in self.layers:
            layer.refresh()

    def span(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens [start, stop) for all layers: [L, H, stop-start, D] views."""
        return self.k[:, :, start:stop], self.v[:, :, start:stop]
