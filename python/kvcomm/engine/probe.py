"""The early-layer probe of the `deviation` recompute policy (kvcomm.plan.recompute), on a
transformers model.

CacheBlend picks the tokens to recompute by how far their reused KV is from what the model
computes for them, measured on an early layer. Here: layers 0..`layer` run over the
candidate positions against the assembled KV (one scattered forward, stopped after that
layer by a forward hook), each candidate's deviation is the squared L2 distance between its
assembled and computed K and V on that layer, summed over heads and channels. Those layers
keep the computed KV of every candidate, as in CacheBlend, whose first layers are
recomputed for every token before it selects.
"""
from __future__ import annotations

import torch

from ..hf.cache import KVBufferCache
from .scatter import forward_scattered


class _Stop(Exception):
    """Raised by the hook after the probe's last layer: the forward goes no further."""


def decoder_layers(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return dec.layers


@torch.inference_mode()
def probe_deviation(model, cache: KVBufferCache, ids: list[int], positions: list[int], total: int,
                    layer: int) -> torch.Tensor:
    """float32 [len(positions)]: per position, the squared distance between the KV the
    buffer holds on `layer` and the KV the model computes there (layers 0..layer run over
    `positions` against the rest of the buffer; afterwards those layers hold the computed KV)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"probe layer {layer} outside the model's {len(layers)} layers")
    pos = torch.tensor(positions, dtype=torch.long, device=cache.k.device)
    old_k = cache.k[layer].index_select(1, pos).float()
    old_v = cache.v[layer].index_select(1, pos).float()

    def stop(*_):
        raise _Stop

    handle = layers[layer].register_forward_hook(stop)
    try:
        forward_scattered(model, cache, ids, positions, total, logits_rows=0)
    except _Stop:
        pass
    finally:
        handle.remove()
    new_k = cache.k[layer].index_select(1, pos).float()
    new_v = cache.v[layer].index_select(1, pos).float()
    dev = (new_k - old_k).pow(2).sum(dim=(0, 2)) + (new_v - old_v).pow(2).sum(dim=(0, 2))
    # A position the buffer held no KV for (a computed slot) may read as NaN: it runs anyway.
    return torch.nan_to_num(dev, nan=float("inf")).cpu()
