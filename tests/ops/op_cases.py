"""Inputs, layouts and tolerances shared by the op tests.

A case's tensors are made on the CPU from a seeded generator and then put on
the backend's device by `Backend.to` (backends.py), so every backend sees the
same numbers and the reference runs on the CPU copies.
"""
from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32, BF16, F16 = DTYPES

# (layers, kv_heads, tokens, head_dim) used by the case lists: GQA/MQA head
# counts, both head dims, odd lengths, one token, and a shape whose rows a
# thread walks in groups when the launch planner assumes a single SM.
MQA_ODD = (2, 1, 7, 64)
GQA3_ODD = (3, 3, 13, 64)
HEADS8_D128 = (2, 8, 5, 128)
ONE_TOKEN = (1, 2, 1, 128)
MANY_ROWS = (3, 7, 100, 128)
EMPTY = (2, 2, 0, 64)


def tol(dtype: torch.dtype) -> dict:
    """Per-dtype tolerances for a result stored in `dtype` (one rounding)."""
    return {
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
        torch.float16: dict(atol=4e-3, rtol=4e-3),
    }[dtype]


# Float32 scores (distances, weights) computed from low-precision inputs.
SCORE_TOL = dict(atol=1e-5, rtol=1e-4)
DISTANCE_TOL = dict(atol=1e-4, rtol=1e-4)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def kv(shape, dtype, g: torch.Generator, device="cpu", extra_tokens: int = 0) -> torch.Tensor:
    L, H, T, D = shape
    return torch.randn(L, H, T + extra_tokens, D, generator=g).to(dtype=dtype, device=device)


def anchors(shape, dtype, n: int, g: torch.Generator, device="cpu", max_extra: int = 3):
    """n anchors, each at least as long as the content (lengths vary)."""
    return [kv(shape, dtype, g, device, extra_tokens=i % (max_extra + 1)) for i in range(n)]


# ---- layouts: the same values in memory laid out differently --------------
#
#   contiguous   the tensor itself (the vector path where the shape allows)
#   padded       token stride D+1 and an odd start: the strided (scalar) path
#   misaligned   contiguous strides, first element one element past a 16-byte
#                boundary: vector strides, scalar path (a GPU faults otherwise)
#   transposed   channel stride != 1 (stored [L, H, D, T]): the scalar path
#   slice        tokens 3..3+T of a [L, H, T+6, D] buffer: vector path, a
#                token stride that is not T*D

def padded(x: torch.Tensor) -> torch.Tensor:
    L, H, T, D = x.shape
    buf = torch.zeros(L, H, T, D + 1, dtype=x.dtype, device=x.device)
    buf[..., 1:] = x
    return buf[..., 1:]


def misaligned(x: torch.Tensor) -> torch.Tensor:
    flat = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = flat[1:].view(x.shape)
    view.copy_(x)
    assert x.numel() == 0 or view.data_ptr() % 16 != 0
    return view


def transposed(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(2, 3).contiguous().transpose(2, 3)


def sliced(x: torch.Tensor) -> torch.Tensor:
    L, H, T, D = x.shape
    buf = torch.zeros(L, H, T + 6, D, dtype=x.dtype, device=x.device)
    buf[:, :, 3:3 + T] = x
    return buf[:, :, 3:3 + T]


LAYOUTS = {"contiguous": lambda x: x, "padded": padded, "misaligned": misaligned,
           "transposed": transposed, "slice": sliced}


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    out = LAYOUTS[layout](x)
    assert torch.equal(out, x)
    return out


def destination(shape, dtype, layout: str, device):
    """(dst, buf, outside) for the _into ops: dst a view of zeroed buffer buf
    laid out as `layout`, outside a mask of the elements of buf that are not
    in dst (they must stay zero)."""
    L, H, T, D = shape
    if layout == "padded":  # tokens 3..3+T and channels 1.. of [L, H, T+6, D+1]
        buf = torch.zeros(L, H, T + 6, D + 1, dtype=dtype, device=device)
        dst = buf[:, :, 3:3 + T, 1:]
    elif layout == "slice":
        buf = torch.zeros(L, H, T + 6, D, dtype=dtype, device=device)
        dst = buf[:, :, 3:3 + T]
    elif layout == "misaligned":
        buf = torch.zeros(L * H * T * D + 2, dtype=dtype, device=device)
        dst = buf[1:-1].view(L, H, T, D)
    else:
        assert layout == "contiguous", layout
        buf = torch.zeros(L, H, T, D, dtype=dtype, device=device)
        dst = buf
    inside = torch.zeros(buf.shape, dtype=torch.uint8, device=device)
    inside.as_strided(dst.shape, dst.stride(), dst.storage_offset() - buf.storage_offset()).fill_(1)
    return dst, buf, inside == 0


def captured(fn) -> "torch.cuda.CUDAGraph":
    """fn() run once on a side stream (warm-up, as capture requires), then captured
    into a CUDA graph, which is returned for replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
