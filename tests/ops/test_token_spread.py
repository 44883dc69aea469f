"""kvcomm.ops.token_spread: the per-token disagreement of anchors' deltas, against the
pure-torch reference, over dtypes and shapes; opcheck; argument errors; and what it
means (zero when the anchors agree, growing with their disagreement)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from backends import backend, emu  # noqa: F401  (fixtures)
from kvcomm import ops, reference as ref

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=1e-4, rtol=1e-4)}

# (layers, heads, tokens, dim, anchors, extra anchor tokens): GQA head counts, head dims
# 64/128, odd lengths, 2 and many anchors, anchors longer than the content.
CASES = [(2, 1, 1, 64, 2, 0), (4, 3, 7, 64, 3, 2), (3, 8, 33, 128, 5, 0), (5, 2, 17, 64, 20, 9)]


def _inputs(L, H, n, D, N, extra, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas = [(torch.randn(L, H, n + extra, D, generator=g) * 0.3 + 1.5).to(dtype) for _ in range(N)]
    w = torch.softmax(torch.randn(N, n, generator=g) * 2, dim=0)
    return deltas, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype):
    deltas, w = _inputs(*case, dtype)
    assert_close(ops.token_spread(deltas, w), ref.token_spread(deltas, w), **TOL[dtype])


# 40 anchors: more than the kernel parameters hold, so the CUDA launcher builds the device table.
BACKEND_CASES = CASES[:3] + [(3, 2, 9, 64, 40, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_backend_matches_reference(backend, case, dtype):
    """The CPU op, the CUDA launcher + kernel body run by the host emulation, and the
    real CUDA kernel, each against the reference; strided (sliced) deltas included."""
    deltas, w = _inputs(*case, dtype)
    if case[5]:  # anchors longer than the content, sliced: a strided view from token 1 on
        deltas = [d[:, :, 1:] for d in deltas]
    got = backend.ops.token_spread(*backend.to((deltas, w)))
    assert got.device == backend.device and got.shape == (w.shape[1],)
    assert_close(got.cpu(), ref.token_spread(deltas, w), **TOL[dtype])


def test_strided_deltas_match_contiguous():
    deltas, w = _inputs(4, 3, 9, 64, 3, 0, torch.float32)
    wide = [torch.cat([d, d], dim=3)[..., ::2] for d in deltas]      # stride 2 in the last dim
    sliced = [torch.randn(4, 3, 20, 64)[:, :, 5:14].copy_(d) for d in deltas]
    expected = ops.token_spread(deltas, w)
    assert not wide[0].is_contiguous() and not sliced[0].is_contiguous()
    assert_close(ops.token_spread(sliced, w), expected)
    assert_close(ops.token_spread([torch.cat([d, d], dim=3)[..., :64] for d in deltas], w), expected)


def test_agreeing_anchors_have_zero_spread_and_disagreement_grows_it():
    d = torch.randn(3, 2, 5, 64)
    w = torch.full((3, 5), 1 / 3)
    assert_close(ops.token_spread([d, d.clone(), d.clone()], w), torch.zeros(5), atol=1e-6, rtol=0)
    noise = torch.randn(3, 2, 5, 64)
    small = ops.token_spread([d, d + 0.1 * noise, d - 0.1 * noise], w)
    large = ops.token_spread([d, d + 1.0 * noise, d - 1.0 * noise], w)
    assert (large > 5 * small).all() and (small > 0).all()


def test_layer0_is_ignored_and_weights_matter():
    d0, d1 = torch.zeros(3, 2, 4, 64), torch.zeros(3, 2, 4, 64)
    d1[0] = 100.0                      # disagreement on layer 0 only: no offset there
    w = torch.full((2, 4), 0.5)
    assert_close(ops.token_spread([d0, d1], w), torch.zeros(4))
    d1[1:, :, 2] = 1.0                 # now token 2 disagrees on every layer >= 1
    s = ops.token_spread([d0, d1], w)
    assert s[2] > 0 and (s[[0, 1, 3]] == 0).all()
    one_sided = torch.tensor([[1.0] * 4, [0.0] * 4])   # all weight on one anchor: no spread
    assert_close(ops.token_spread([d0, d1], one_sided), torch.zeros(4))


def test_fewer_than_two_anchors_or_one_layer_is_zero():
    d = torch.randn(1, 2, 6, 64)
    assert_close(ops.token_spread([d, d + 1], torch.full((2, 6), 0.5)), torch.zeros(6))
    assert_close(ops.token_spread([torch.randn(3, 2, 6, 64)], torch.ones(1, 6)), torch.zeros(6))
    assert ops.token_spread([], torch.empty(0, 6)).shape == (6,)


def test_opcheck():
    deltas, w = _inputs(3, 2, 5, 64, 3, 1, torch.float32)
    torch.library.opcheck(torch.ops.kvcomm.token_spread.default, (deltas, w))


@pytest.mark.parametrize("bad, needle", [
    (lambda d, w: (d, w.double()), "weights must be float32"),
    (lambda d, w: (d, w[:, :1].expand(3, 5).contiguous()[:2]), "weights must be [num_deltas, tokens]"),
    (lambda d, w: ([d[0], d[1].half(), d[2]], w), "deltas[1]"),
    (lambda d, w: ([d[0], d[1][:, :, :2], d[2]], w), "fewer than the content's 5"),
    (lambda d, w: ([d[0], d[1][:1], d[2]], w), "layers, kv_heads and head_dim must match"),
    (lambda d, w: ([d[0][0]] + d[1:], w), "4-D"),
])
def test_bad_arguments_are_named(bad, needle):
    deltas, w = _inputs(3, 2, 5, 64, 3, 0, torch.float32)
    with pytest.raises(RuntimeError, match=None) as e:
        ops.token_spread(*bad(deltas, w))
    assert needle in str(e.value) and "kvcomm.token_spread" in str(e.value)
