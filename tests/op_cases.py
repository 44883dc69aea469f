"""Shared inputs and tolerances for the op tests (CPU here, CUDA in
test_cuda_ops.py)."""
from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (layers, kv_heads, tokens, head_dim): GQA head counts, both head dims, odd lengths.
SHAPES = [(2, 1, 7, 64), (3, 3, 13, 64), (2, 8, 5, 128), (1, 2, 1, 128)]

ANCHOR_COUNTS = [1, 4, 20]


def tol(dtype: torch.dtype) -> dict:
    """Per-dtype tolerances for a result stored in `dtype` (one rounding)."""
    return {
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
        torch.float16: dict(atol=4e-3, rtol=4e-3),
    }[dtype]


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def kv(shape, dtype, gen: torch.Generator, device="cpu", extra_tokens: int = 0) -> torch.Tensor:
    L, H, T, D = shape
    return torch.randn(L, H, T + extra_tokens, D, generator=gen).to(dtype=dtype, device=device)


def anchors(shape, dtype, n: int, gen: torch.Generator, device="cpu", max_extra: int = 3):
    """n anchors, each at least as long as the content (lengths vary)."""
    return [kv(shape, dtype, gen, device, extra_tokens=i % (max_extra + 1)) for i in range(n)]


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
