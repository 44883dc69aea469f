"""Pure-torch reference of every kvcomm op and of AnchorPool.estimate.

Slow and simple on purpose: each function is the method's formula (docs/method.md) written with
plain torch ops in float32, the yardstick the C++/CUDA ops are tested against.
Content KV layout: [layers, kv_heads, tokens, head_dim].
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def _shift_rows(shift: int | Tensor, tokens: int) -> Tensor:
    """Shift (an int, or a tensor [] or [T], as kvcomm.ops takes it) as float32
    [tokens or 1, 1] rows on the CPU, for broadcasting."""
    s = torch.as_tensor(shift).detach().cpu().reshape(-1).to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1, 1)
    assert s.numel() == tokens
    return s.reshape(tokens, 1)


def rope_rotate(x: Tensor, inv_freq: Tensor, shift: int | Tensor) -> Tensor:
    """Rotate-half RoPE by `shift` positions, float32 math, result float32."""
    x = x.to(torch.float32)
    half = x.shape[-1] // 2
    angle = _shift_rows(shift, x.shape[2]).to(x.device) * inv_freq.to(x.device, torch.float32)
    cos, sin = angle.cos(), angle.sin()  # [T or 1, half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_move(keys: Tensor, inv_freq: Tensor, shift: int | Tensor) -> Tensor:
    return rope_rotate(keys, inv_freq, shift).to(keys.dtype)


def _values(anchors: Sequence[Tensor], scales: Sequence[Tensor] | None) -> list[Tensor]:
    """Anchors as float32 values: compact ones (int8 / fp8 codes with float32 scales
    [L, H, 1, D]) decoded as code * scale, as the kernels decode them."""
    if scales is None:
        return [a.to(torch.float32) for a in anchors]
    assert len(scales) == len(anchors), "one scale tensor per compact anchor"
    return [a.to(torch.float32) * s.to(torch.float32) for a, s in zip(anchors, scales)]


def value_distances(content: Tensor, anchors: Sequence[Tensor], rms: bool = False,
                    anchor_scales: Sequence[Tensor] | None = None) -> Tensor:
    anchors = _values(anchors, anchor_scales)
    n = content.shape[2]
    c = content.to(torch.float32)
    out = []
    for a in anchors:
        diff = c - a[:, :, :n].to(torch.float32)
        sq = diff.double().pow(2).sum()
        if rms:
            sq = sq / max(diff.numel(), 1)
        out.append(sq.sqrt().float())
    return torch.stack(out) if out else torch.empty(0, device=content.device)


def match_decide(distances: Tensor, tau: float, gamma: float, top_p: float):
    """(probs, entropy bits, share, credit) of docs/method.md, "Deciding"."""
    d = distances.to(torch.float32)
    n = d.numel()
    # Shift by the minimum before dividing (as the kernels do) so huge finite
    # distances do not overflow to -inf.
    probs = torch.softmax(-(d - d.min()) / tau, dim=0) if n else d.clone()
    p = probs[probs > 0]
    entropy = -(p * p.log2()).sum() if n else torch.zeros((), device=d.device)
    credit = torch.zeros(n, dtype=torch.bool, device=d.device)
    if n and not torch.isfinite(d).all():
        # Non-finite values never count as a confident match.
        return probs, torch.tensor(float("nan"), device=d.device), torch.tensor(False, device=d.device), credit
    share = n >= 2 and float(entropy) <= gamma * math.log2(n)
    if share:
        # Stable descending order: ties go to the lower index.
        order = sorted(range(n), key=lambda i: (-float(probs[i]), i))
        cum = torch.zeros((), dtype=torch.float32)
        for i in order:
            credit[i] = True
            cum = cum + probs[i].cpu()  # float32 running sum, as the kernels
            if float(cum) >= top_p:
                break
    return probs, entropy.to(torch.float32), torch.tensor(share, device=d.device), credit


def token_weights(base: Tensor, anchors: Sequence[Tensor], tau: float,
                  anchor_scales: Sequence[Tensor] | None = None) -> Tensor:
    anchors = _values(anchors, anchor_scales)
    n = base.shape[2]
    b = base.to(torch.float32)
    if not anchors:
        return torch.empty(0, n, device=base.device)
    s = torch.stack([(b - a[:, :, :n].to(torch.float32)).abs().mean(dim=(0, 1, 3)) for a in anchors])
    return torch.softmax(-s / tau, dim=0)


def segment_weights(base: Tensor, anchors: Sequence[Tensor], tau: float,
                    anchor_scales: Sequence[Tensor] | None = None) -> Tensor:
    anchors = _values(anchors, anchor_scales)
    L, H, n, D = base.shape
    b = base.to(torch.float32)
    if not anchors:
        return torch.empty(0, L, H, D, device=base.device)
    r = torch.stack([(b - a[:, :, a.shape[2] - n:].to(torch.float32)).pow(2).sum(dim=2).sqrt() for a in anchors])
    return torch.softmax(-r / tau, dim=0)


def fused_offset(base: Tensor, deltas: Sequence[Tensor], weights: Tensor, shift: int | Tensor,
                 inv_freq: Tensor | None = None,
                 delta_scales: Sequence[Tensor] | None = None) -> Tensor:
    deltas = _values(deltas, delta_scales)
    L, H, T, D = base.shape
    acc = base.to(torch.float32).clone()
    for u, delta in enumerate(deltas):
        if weights.dim() == 2:
            w = weights[u].to(torch.float32).view(1, 1, T, 1)
        else:
            w = weights[u].to(torch.float32).view(L, H, 1, D)
        acc[1:] += (w * delta[:, :, :T].to(torch.float32))[1:]
    if inv_freq is not None:
        acc = rope_rotate(acc, inv_freq, shift)
    return acc.to(base.dtype)


def token_spread(deltas: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Per token: sqrt(mean over layers >= 1, heads, channels of sum_u w_u (d_u - mean_w d)^2)."""
    n = weights.shape[1]
    out = torch.zeros(n, dtype=torch.float32, device=weights.device)
    if len(deltas) < 2 or deltas[0].shape[0] < 2 or n == 0:
        return out
    x = torch.stack([d[1:, :, :n].to(torch.float32) for d in deltas])  # [N, L-1, H, n, D]
    w = weights.to(torch.float32).view(len(deltas), 1, 1, n, 1)
    mean = (w * x).sum(0)
    var = (w * (x - mean) ** 2).sum(0)                                  # [L-1, H, n, D]
    return var.double().mean(dim=(0, 1, 3)).sqrt().float()


def estimate(pool_anchors, base_k: Tensor, base_v: Tensor, inv_freq: Tensor, position: int,
             tau: float, seg_template_k: Tensor | None = None, seg_template_v: Tensor | None = None,
             seg_position: int = 0):
    """AnchorPool.estimate in plain torch.

    pool_anchors: the usable anchors, each a dict with base_k, base_v and the
    agent's deltas ph_k, ph_v, seg_k, seg_v (neutral frame). Returns
    (k, v, seg_k, seg_v) at the target positions (seg_* None without a segment).
    """
    n = base_k.shape[2]
    shift = torch.tensor(position)
    wk = token_weights(base_k, [a["base_k"] for a in pool_anchors], tau)
    wv = token_weights(base_v, [a["base_v"] for a in pool_anchors], tau)
    k = fused_offset(base_k, [a["ph_k"][:, :, :n] for a in pool_anchors], wk, shift, inv_freq)
    v = fused_offset(base_v, [a["ph_v"][:, :, :n] for a in pool_anchors], wv, shift, None)
    if seg_template_k is None:
        return k, v, None, None
    sk_w = segment_weights(base_k, [a["base_k"] for a in pool_anchors], tau)
    sv_w = segment_weights(base_v, [a["base_v"] for a in pool_anchors], tau)
    seg_shift = torch.tensor(seg_position)
    seg_k = fused_offset(seg_template_k, [a["seg_k"] for a in pool_anchors], sk_w, seg_shift, inv_freq)
    seg_v = fused_offset(seg_template_v, [a["seg_v"] for a in pool_anchors], sv_w, seg_shift, None)
    return k, v, seg_k, seg_v


# Anchor storage (docs/method.md, "Compact anchors"): the largest magnitude each scaled format holds.
_STORAGE_TOP = {"int8": 127.0, "fp8": 448.0}


def compact_anchor(t: Tensor, storage: str) -> tuple[Tensor, Tensor | None]:
    """(data, scale) as AnchorPool holds `t` [L, H, T, D] in `storage`: 'model' keeps it,
    'bf16' casts, 'int8' / 'fp8' divide by a float32 scale per (layer, head, channel),
    amax over the tokens / 127 (int8, rounded half to even and clamped) or / 448 (fp8
    e4m3); an all-zero channel has scale 1."""
    if storage == "model":
        return t.clone(), None
    if storage == "bf16":
        return t.to(torch.bfloat16), None
    x = t.to(torch.float32)
    amax = x.abs().amax(dim=2, keepdim=True)
    scale = torch.where(amax > 0, amax / _STORAGE_TOP[storage], torch.ones_like(amax))
    scaled = x / scale
    if storage == "int8":
        return scaled.round().clamp(-127, 127).to(torch.int8), scale
    return scaled.to(torch.float8_e4m3fn), scale


def expand_anchor(data: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The values a stored anchor tensor stands for, in the model's `dtype`."""
    if scale is None:
        return data.to(dtype)
    return (data.to(torch.float32) * scale).to(dtype)
