"""Python wrappers of torch.ops.kvcomm, with fake kernels for torch.compile.

Content KV layout everywhere: [layers, kv_heads, tokens, head_dim] (L, H, T, D),
dtype float32, bfloat16 or float16. Keys in a pool are stored in the
position-neutral frame (the content's first token at position 0).

Compact anchors and deltas (docs/method.md, "Compact anchors"): value_distances,
token_weights, segment_weights and the fused offsets also take int8 or
float8_e4m3fn codes with `anchor_scales` / `delta_scales`, one float32 tensor
[L, H, 1, D] per code tensor; the value read is code * scale, decoded in the
kernels' registers (no decoded copy). kvcomm.reference.compact_anchor makes
such a pair from a tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library that registers the ops)

_ops = torch.ops.kvcomm


def kernel_device_types() -> frozenset[str]:
    """Device types every torch.ops.kvcomm op has a kernel for in this build: "cpu",
    and "cuda" when the extension was compiled with its CUDA kernels (torch with CUDA
    and nvcc at build time, or KVCOMM_CUDA=1)."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kvcomm::")]
    return frozenset(kind for kind, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if names and all(torch._C._dispatch_has_kernel_for_dispatch_key(n, key) for n in names))


def _as_shift(shift: int | Tensor, like: Tensor) -> Tensor:
    if isinstance(shift, Tensor):
        return shift
    # torch.full, not torch.tensor: on CUDA a fill kernel, where torch.tensor would copy
    # from pageable host memory (a stream sync before every op call).
    return torch.full((), int(shift), dtype=torch.int64, device=like.device)


def rope_move(keys: Tensor, inv_freq: Tensor, shift: int | Tensor) -> Tensor:
    """Keys [L,H,T,D] moved by `shift` positions (int, int64 [] or [T]).

    inv_freq: float32 [D/2], the model's rotate-half RoPE frequencies. Exact:
    keys computed at positions p moved by s equal keys computed at p + s.
    """
    return _ops.rope_move(keys, inv_freq, _as_shift(shift, keys))


def rope_move_(keys: Tensor, inv_freq: Tensor, shift: int | Tensor) -> Tensor:
    """In-place rope_move; `keys` may be a strided slice of a KV buffer."""
    _ops.rope_move_(keys, inv_freq, _as_shift(shift, keys))
    return keys


def _scales(scales: Sequence[Tensor] | None) -> list[Tensor] | None:
    return None if scales is None else list(scales)


def value_distances(content: Tensor, anchors: Sequence[Tensor], rms: bool = False,
                    anchor_scales: Sequence[Tensor] | None = None) -> Tensor:
    """float32 [N]: ||content - anchor_u[:, :, :n]|| over all elements.

    content [L,H,n,D]; anchors: N tensors [L,H,m_u,D] with m_u >= n, in content's
    dtype, or int8 / float8_e4m3fn codes with anchor_scales (module docstring). rms=True
    divides the squared sum by the element count (scale-free distance).
    """
    return _ops.value_distances(content, list(anchors), rms, _scales(anchor_scales))


def match_decide(distances: Tensor, tau: float = 1.0, gamma: float = 0.3, top_p: float = 0.9):
    """docs/method.md, "Deciding" decision from distances [N] (float32).

    Returns (probs [N] float32, entropy [] float32 bits, share [] bool,
    credit [N] bool): share iff N >= 2 and entropy <= gamma*log2(N); credit
    marks the smallest most-probable set with probability >= top_p.
    """
    return _ops.match_decide(distances, tau, gamma, top_p)


def token_weights(base: Tensor, anchors: Sequence[Tensor], tau: float = 1.0,
                  anchor_scales: Sequence[Tensor] | None = None) -> Tensor:
    """float32 [N, n]: softmax_u(-mean_{l,h,d}|base[t] - anchor_u[t]| / tau).
    Compact anchors with anchor_scales (module docstring)."""
    return _ops.token_weights(base, list(anchors), tau, _scales(anchor_scales))


def segment_weights(base: Tensor, anchors: Sequence[Tensor], tau: float = 1.0,
                    anchor_scales: Sequence[Tensor] | None = None) -> Tensor:
    """float32 [N, L, H, D]: softmax_u(-||base - anchor_u[:, :, -n:]||_t / tau).
    Compact anchors with anchor_scales (module docstring)."""
    return _ops.segment_weights(base, list(anchors), tau, _scales(anchor_scales))


def fused_offset(base: Tensor, deltas: Sequence[Tensor], weights: Tensor, shift: int | Tensor,
                 inv_freq: Tensor | None = None,
                 delta_scales: Sequence[Tensor] | None = None) -> Tensor:
    """New tensor [L,H,T,D]: rot(base + sum_u w_u * delta_u, shift).

    deltas: N tensors [L,H,>=T,D] (first T tokens used), added on layers >= 1
    only, in base's dtype or int8 / float8_e4m3fn codes with delta_scales (module
    docstring); weights float32 [N, T] (per token) or [N, L, H, D] (per channel);
    rotation only when inv_freq is given (keys), none for values.
    """
    return _ops.fused_offset(base, list(deltas), weights, _as_shift(shift, base), inv_freq,
                             _scales(delta_scales))


def fused_offset_into(dst: Tensor, base: Tensor, deltas: Sequence[Tensor], weights: Tensor,
                      shift: int | Tensor, inv_freq: Tensor | None = None,
                      delta_scales: Sequence[Tensor] | None = None) -> Tensor:
    """fused_offset written into dst [L,H,T,D] (any strides); returns dst."""
    _ops.fused_offset_into(dst, base, list(deltas), weights, _as_shift(shift, base), inv_freq,
                           _scales(delta_scales))
    return dst


def token_spread(deltas: Sequence[Tensor], weights: Tensor) -> Tensor:
    """float32 [n]: how much N anchors disagree on each token's offset.

    deltas: N tensors [L,H,>=n,D] (first n tokens used); weights: float32 [N, n]
    per-token weights whose columns sum to 1 (token_weights). Per token, the root
    of the mean over layers >= 1, heads and channels of the weighted variance of
    the deltas across anchors. Zeros when N < 2 or L == 1.
    """
    return _ops.token_spread(list(deltas), weights)


# ---- fake kernels: shapes only, so torch.compile and FakeTensor can trace ----

@torch.library.register_fake("kvcomm::rope_move")
def _rope_move_fake(keys, inv_freq, shift):
    return torch.empty_like(keys, memory_format=torch.contiguous_format)


@torch.library.register_fake("kvcomm::rope_move_")
def _rope_move_inplace_fake(keys, inv_freq, shift):
    return None


@torch.library.register_fake("kvcomm::value_distances")
def _value_distances_fake(content, anchors, rms=False, anchor_scales=None):
    return content.new_empty(len(anchors), dtype=torch.float32)


@torch.library.register_fake("kvcomm::match_decide")
def _match_decide_fake(distances, tau, gamma, top_p):
    n = distances.shape[0]
    return (distances.new_empty(n), distances.new_empty(()),
            distances.new_empty((), dtype=torch.bool), distances.new_empty(n, dtype=torch.bool))


@torch.library.register_fake("kvcomm::token_weights")
def _token_weights_fake(base, anchors, tau, anchor_scales=None):
    return base.new_empty(len(anchors), base.shape[2], dtype=torch.float32)


@torch.library.register_fake("kvcomm::segment_weights")
def _segment_weights_fake(base, anchors, tau, anchor_scales=None):
    L, H, _, D = base.shape
    return base.new_empty(len(anchors), L, H, D, dtype=torch.float32)


@torch.library.register_fake("kvcomm::fused_offset")
def _fused_offset_fake(base, deltas, weights, shift, inv_freq, delta_scales=None):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.register_fake("kvcomm::fused_offset_into")
def _fused_offset_into_fake(dst, base, deltas, weights, shift, inv_freq, delta_scales=None):
    return None


@torch.library.register_fake("kvcomm::token_spread")
def _token_spread_fake(deltas, weights):
    return weights.new_empty(weights.shape[1], dtype=torch.float32)
