"""A dimension of size 1 never blocks the vector path (cuda/launchers.cuh
stride_used): its index is always 0, so whatever stride torch keeps for it (odd
ones included, which contiguous() does not change) moves no pointer. MQA shapes
(one KV head), one layer and one token, plain and compact (int8 / fp8 with
[L, 1, 1, D] scales), on every backend against the reference; the emulated
backend also logs the kernel variant each launch ran, which must be the vector
one. A dimension longer than 1 with an odd stride still takes the strided path."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kvcomm import reference as ref
from backends import EmulatedOps, backend, emu  # noqa: F401  (fixtures)
from op_cases import BF16, F32, SCORE_TOL, gen, inv_freq, kv, padded, tol

FP8 = torch.float8_e4m3fn
STORAGE = {torch.int8: "int8", FP8: "fp8"}


def odd_size_one_strides(x: torch.Tensor) -> torch.Tensor:
    """x's values in a tensor whose size-1 dimensions have stride 3 (contiguous
    strides otherwise), which torch still calls contiguous."""
    strides = [3 if n == 1 else s for n, s in zip(x.shape, x.contiguous().stride())]
    out = torch.empty_strided(x.shape, strides, dtype=x.dtype)
    out.copy_(x)
    assert out.is_contiguous() and out.stride() != x.contiguous().stride()
    return out


def compact(t: torch.Tensor, code: torch.dtype):
    data, scale = ref.compact_anchor(t, STORAGE[code])
    return data.view(code), scale


class Paths:
    """The paths the emulated launches of a kernel took since the last call;
    None on the other backends (nothing to log)."""

    def __init__(self, backend, request):
        self._emu = request.getfixturevalue("emu") if backend.name == "emulated" else None
        self.taken(None)

    def taken(self, kernel: str | None) -> set[str] | None:
        if self._emu is None:
            return None
        log = self._emu.take_launch_log()
        return {e.split(":")[1] for e in log if e.startswith(f"{kernel}:")}

    def assert_vector(self, kernel: str) -> None:
        assert self.taken(kernel) in (None, {"vector"})


SHAPES = {"mqa": (2, 1, 7, 64), "one-layer": (1, 3, 5, 32), "one-token-mqa": (3, 1, 1, 128)}


@pytest.mark.parametrize("code", [None, torch.int8, FP8], ids=["plain", "int8", "fp8"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_scores_take_the_vector_path(backend, request, shape, code):
    g = gen(1)
    content = kv(shape, F32, g)
    dense = [kv(shape, F32, g, extra_tokens=i) for i in range(3)]
    if code is None:
        anchors, scales, odd_scales = dense, None, None
    else:
        pairs = [compact(a, code) for a in dense]
        anchors, scales = [p[0] for p in pairs], [p[1] for p in pairs]
        odd_scales = backend.to([odd_size_one_strides(s) for s in scales])
    odd_content = backend.to(odd_size_one_strides(content))
    odd_anchors = backend.to([odd_size_one_strides(a) for a in anchors])
    paths = Paths(backend, request)
    got = backend.ops.value_distances(odd_content, odd_anchors, False, anchor_scales=odd_scales)
    paths.assert_vector("distance_kernel")
    assert_close(got.cpu(), ref.value_distances(content, anchors, False, anchor_scales=scales),
                 atol=1e-4, rtol=1e-4)
    got = backend.ops.token_weights(odd_content, odd_anchors, 0.5, anchor_scales=odd_scales)
    paths.assert_vector("token_score_kernel")
    assert_close(got.cpu(), ref.token_weights(content, anchors, 0.5, anchor_scales=scales), **SCORE_TOL)


@pytest.mark.parametrize("code", [None, torch.int8, FP8], ids=["plain", "int8", "fp8"])
@pytest.mark.parametrize("keys", [True, False], ids=["keys", "values"])
def test_fused_offset_takes_the_vector_path(backend, request, keys, code):
    shape = SHAPES["mqa"]
    g = gen(2)
    base = kv(shape, BF16, g)
    dense = [kv(shape, BF16, g, extra_tokens=1) for _ in range(2)]
    if code is None:
        deltas, scales, odd_scales = dense, None, None
    else:
        pairs = [compact(d.float(), code) for d in dense]
        deltas, scales = [p[0] for p in pairs], [p[1] for p in pairs]
        odd_scales = backend.to([odd_size_one_strides(s) for s in scales])
    weights = torch.softmax(torch.randn(2, shape[2], generator=g), 0)
    f = inv_freq(shape[3]) if keys else None
    dst = backend.to(odd_size_one_strides(torch.zeros(shape, dtype=BF16)))
    paths = Paths(backend, request)
    backend.ops.fused_offset_into(dst, backend.to(odd_size_one_strides(base)),
                                  backend.to([odd_size_one_strides(d) for d in deltas]), backend.to(weights),
                                  11, backend.to(f), delta_scales=odd_scales)
    paths.assert_vector("offset_kernel")
    assert_close(dst.cpu(), ref.fused_offset(base, deltas, weights, 11, f, delta_scales=scales), **tol(BF16))


def test_a_longer_dimension_with_an_odd_stride_stays_strided(emu):
    shape = SHAPES["mqa"]
    g = gen(3)
    content, anchor = kv(shape, F32, g), kv(shape, F32, g)
    emu.take_launch_log()
    got = EmulatedOps(emu).value_distances(padded(content), [anchor], False)  # token stride D + 1
    assert {e for e in emu.take_launch_log() if e.startswith("distance_kernel")} == {"distance_kernel:strided"}
    assert_close(got, ref.value_distances(content, [anchor], False), atol=1e-4, rtol=1e-4)
