"""Every kvcomm op against its pure-torch reference on CPU."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from kvcomm import ops
from kvcomm import reference as ref
from op_cases import ANCHOR_COUNTS, DTYPES, SHAPES, anchors, inv_freq, kv, tol

GRID = list(itertools.product(DTYPES, SHAPES))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype,shape", GRID)
@pytest.mark.parametrize("per_token", [False, True])
def test_rope_move_matches_reference(dtype, shape, per_token):
    g = gen(1)
    keys = kv(shape, dtype, g)
    f = inv_freq(shape[3])
    shift = torch.randint(-50, 500, (shape[2],), generator=g) if per_token else torch.tensor(37)
    assert_close(ops.rope_move(keys, f, shift), ref.rope_move(keys, f, shift), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_move_inplace_on_buffer_slice(dtype):
    g = gen(2)
    buf = kv((3, 2, 20, 64), dtype, g)
    original = buf.clone()
    f = inv_freq(64)
    view = buf[:, :, 5:12]  # strided slice of a KV buffer
    expected = ref.rope_move(view.clone(), f, torch.tensor(11))
    ops.rope_move_(view, f, 11)
    assert_close(buf[:, :, 5:12], expected, **tol(dtype))
    assert torch.equal(buf[:, :, :5], original[:, :, :5])
    assert torch.equal(buf[:, :, 12:], original[:, :, 12:])


def test_rope_move_round_trip_is_identity():
    keys = kv((2, 3, 9, 64), torch.float32, gen(3))
    f = inv_freq(64)
    back = ops.rope_move(ops.rope_move(keys, f, 1234), f, -1234)
    assert_close(back, keys, atol=2e-4, rtol=1e-4)


def test_rope_move_composes():
    keys = kv((2, 3, 9, 128), torch.float32, gen(4))
    f = inv_freq(128)
    assert_close(ops.rope_move(ops.rope_move(keys, f, 20), f, 17), ops.rope_move(keys, f, 37),
                 atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,shape", GRID)
@pytest.mark.parametrize("n_anchors", ANCHOR_COUNTS)
@pytest.mark.parametrize("rms", [False, True])
def test_value_distances_matches_reference(dtype, shape, n_anchors, rms):
    g = gen(5)
    content = kv(shape, dtype, g)
    pool = anchors(shape, dtype, n_anchors, g)
    assert_close(ops.value_distances(content, pool, rms), ref.value_distances(content, pool, rms),
                 atol=1e-4, rtol=1e-4)


def test_value_distances_identical_anchor_is_zero():
    g = gen(6)
    content = kv((2, 2, 6, 64), torch.float32, g)
    longer = torch.cat([content, kv((2, 2, 3, 64), torch.float32, g)], dim=2)
    d = ops.value_distances(content, [longer, kv((2, 2, 6, 64), torch.float32, g)])
    assert d[0] == 0 and d[1] > 0


@pytest.mark.parametrize("n", [0, 1, 2, 5, 20])
@pytest.mark.parametrize("tau,gamma,top_p", [(1.0, 0.3, 0.9), (5.0, 0.9, 0.5), (0.5, 0.0, 1.0)])
def test_match_decide_matches_reference(n, tau, gamma, top_p):
    d = torch.rand(n, generator=gen(n)) * 4
    got = ops.match_decide(d, tau, gamma, top_p)
    exp = ref.match_decide(d, tau, gamma, top_p)
    assert_close(got[0], exp[0])
    assert_close(got[1], exp[1], atol=1e-5, rtol=1e-5)
    assert bool(got[2]) == bool(exp[2])
    assert torch.equal(got[3], exp[3])


def test_match_decide_gate_and_credit():
    # One anchor far closer than the rest: low entropy, share, credit just it.
    probs, entropy, share, credit = ops.match_decide(torch.tensor([0.0, 30.0, 31.0]), 1.0, 0.3, 0.9)
    assert bool(share) and credit.tolist() == [True, False, False]
    # All equally close: entropy log2(3) > 0.3*log2(3): become an anchor.
    probs, entropy, share, credit = ops.match_decide(torch.tensor([2.0, 2.0, 2.0]), 1.0, 0.3, 0.9)
    assert not bool(share) and not credit.any()
    assert_close(entropy, torch.tensor(torch.log2(torch.tensor(3.0)).item()))
    # Two close anchors share the top-p mass: both credited.
    _, _, share, credit = ops.match_decide(torch.tensor([0.0, 0.1, 40.0]), 1.0, 0.9, 0.9)
    assert bool(share) and credit.tolist() == [True, True, False]
    # A single candidate never shares (SPEC: fewer than 2 -> new anchor).
    assert not bool(ops.match_decide(torch.tensor([0.0]), 1.0, 0.3, 0.9)[2])


@pytest.mark.parametrize("dtype,shape", GRID)
@pytest.mark.parametrize("n_anchors", ANCHOR_COUNTS)
def test_token_weights_matches_reference(dtype, shape, n_anchors):
    g = gen(7)
    base = kv(shape, dtype, g)
    pool = anchors(shape, dtype, n_anchors, g)
    w = ops.token_weights(base, pool, 0.7)
    assert w.shape == (n_anchors, shape[2]) and w.dtype == torch.float32
    assert_close(w, ref.token_weights(base, pool, 0.7), atol=1e-5, rtol=1e-4)
    assert_close(w.sum(0), torch.ones(shape[2]))


@pytest.mark.parametrize("dtype,shape", GRID)
@pytest.mark.parametrize("n_anchors", ANCHOR_COUNTS)
def test_segment_weights_matches_reference(dtype, shape, n_anchors):
    g = gen(8)
    base = kv(shape, dtype, g)
    pool = anchors(shape, dtype, n_anchors, g)
    w = ops.segment_weights(base, pool, 2.0)
    assert w.shape == (n_anchors, *shape[:2], shape[3])
    assert_close(w, ref.segment_weights(base, pool, 2.0), atol=1e-5, rtol=1e-4)


def test_segment_weights_use_the_anchors_last_tokens():
    g = gen(9)
    base = kv((2, 2, 4, 64), torch.float32, g)
    # Anchor 0 ends with exactly the content; anchor 1 starts with it.
    a0 = torch.cat([kv((2, 2, 3, 64), torch.float32, g), base], dim=2)
    a1 = torch.cat([base, kv((2, 2, 3, 64), torch.float32, g)], dim=2)
    w = ops.segment_weights(base, [a0, a1], 0.1)
    assert torch.all(w[0] > 0.99)


@pytest.mark.parametrize("dtype,shape", GRID)
@pytest.mark.parametrize("n_anchors", [0, 1, 4, 20])
@pytest.mark.parametrize("weights_kind", ["token", "channel"])
@pytest.mark.parametrize("keys", [True, False])
def test_fused_offset_matches_reference(dtype, shape, n_anchors, weights_kind, keys):
    g = gen(10)
    L, H, T, D = shape
    base = kv(shape, dtype, g)
    deltas = anchors(shape, dtype, n_anchors, g)
    if weights_kind == "token":
        w = torch.softmax(torch.randn(n_anchors, T, generator=g), 0)
    else:
        w = torch.softmax(torch.randn(n_anchors, L, H, D, generator=g), 0)
    f = inv_freq(D) if keys else None
    shift = torch.tensor(123)
    exp = ref.fused_offset(base, deltas, w, shift, f)
    assert_close(ops.fused_offset(base, deltas, w, shift, f), exp, **tol(dtype))
    # Into a strided slice of a bigger buffer, leaving the rest alone.
    buf = torch.zeros(L, H, T + 6, D, dtype=dtype)
    ops.fused_offset_into(buf[:, :, 3:3 + T], base, deltas, w, shift, f)
    assert_close(buf[:, :, 3:3 + T], exp, **tol(dtype))
    assert not buf[:, :, :3].any() and not buf[:, :, 3 + T:].any()


def test_fused_offset_leaves_layer0_without_offset():
    g = gen(11)
    base = kv((3, 2, 5, 64), torch.float32, g)
    deltas = anchors((3, 2, 5, 64), torch.float32, 2, g)
    w = torch.full((2, 5), 0.5)
    f = inv_freq(64)
    out = ops.fused_offset(base, deltas, w, 9, f)
    assert_close(out[0], ops.rope_move(base, f, 9)[0])
    assert not torch.allclose(out[1], ops.rope_move(base, f, 9)[1])


def test_fused_offset_per_token_shift():
    g = gen(12)
    base = kv((2, 2, 6, 64), torch.float32, g)
    shift = torch.arange(6) * 7 + 100
    f = inv_freq(64)
    w = torch.empty(0, 6)
    assert_close(ops.fused_offset(base, [], w, shift, f), ref.rope_move(base, f, shift), **tol(torch.float32))
