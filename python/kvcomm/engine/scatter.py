"""One forward over prompt tokens at scattered positions, against KV already in the buffer.

The reuse path assembles most of a prompt's KV without running the model (the exact
prefix, estimated slots and segments). Selective recompute and partial reuse then run
*some* of the prompt's tokens through the model: the last token, an agent's own segments,
the first tokens of a slot, a slot that could not be estimated. Those tokens need not be
contiguous. This module runs them in one forward:

- each recomputed token keeps its true position (RoPE by `position_ids`);
- each layer writes the recomputed tokens' K/V into the shared buffer at their positions
  (`index_copy_`) before attending, so a recomputed token sees the other recomputed
  tokens of the same forward as computed by that layer, exactly as in a prefill;
- attention is causal by position: query at position p attends to every buffer position
  <= p, whether estimated, exact or recomputed now.

With every position after a prefix recomputed, this is an ordinary prefill; with only the
last position, it is the last-token step of the reuse path.
"""
from __future__ import annotations

import torch
from ..hf.cache import KVBufferCache
from .window_cache import PositionedCache


def check_positions(positions: list[int], total: int) -> None:
    """Positions of one scattered forward: strictly increasing, inside [0, total)."""
    if not positions:
        raise ValueError("scattered forward: no positions to compute")
    if positions[0] < 0 or positions[-1] >= total:
        raise ValueError(f"scattered forward: positions must lie in [0, {total}), got "
                         f"{positions[0]}..{positions[-1]}")
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError("scattered forward: positions must be strictly increasing")


@torch.inference_mode()
def forward_scattered(model, cache: KVBufferCache, ids: list[int], positions: list[int], total: int,
                      logits_rows: int = 1) -> torch.Tensor | None:
    """Runs token `ids[i]` at `positions[i]` against the first `total` buffer positions.

    Every buffer position in [0, total) that is not in `positions` must already hold valid
    K/V (exact, estimated or computed earlier). Afterwards all `total` positions are valid
    and the cache length is `total`. Returns float32 logits [logits_rows, vocab] of the last
    `logits_rows` ids (None for 0)."""
    if len(ids) != len(positions):
        raise ValueError(f"scattered forward: {len(ids)} ids for {len(positions)} positions")
    check_positions(positions, total)
    cache.ensure_capacity(total)
    device = cache.k.device
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    mask = (torch.arange(total, device=device).view(1, total) <= pos.view(-1, 1)).view(1, 1, len(pos), total)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(input_ids=x, position_ids=pos.view(1, -1), attention_mask=mask,
                past_key_values=PositionedCache(cache, total, pos, compileable=False), use_cache=True,
                logits_to_keep=max(int(logits_rows), 1))
    cache.set_length(total)
    if logits_rows <= 0:
        return None
    return out.logits[0, -logits_rows:].float()
