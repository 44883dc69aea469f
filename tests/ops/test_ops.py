"""Every kvcomm op against its pure-torch reference (kvcomm.reference), one test
body per op over the `backend` fixture (cpu / emulated / cuda, backends.py) and a
chosen list of cases. Non-CPU backends are also compared with the CPU op.

The cases are picked to reach every branch of the CUDA launchers and kernels
(tests/ops/README.md lists the branches and the case that reaches each) and
the CPU kernels' layouts: each dtype, 0 / 1 / many anchors (across the
kernel-parameter table size), edge shapes (one token, no tokens, odd lengths,
head_dim 64 / 128 / 576, GQA and MQA head counts), and strided, misaligned,
transposed and aliased inputs. `sms` is the SM count the emulated launch
planner assumes (1 makes threads walk several rows and tokens).
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kvcomm import ops
from kvcomm import reference as ref
from backends import backend, emu  # noqa: F401  (fixtures)
from op_cases import (BF16, DISTANCE_TOL, EMPTY, F16, F32, GQA3_ODD, HEADS8_D128, MANY_ROWS, MQA_ODD,
                      ONE_TOKEN, SCORE_TOL, anchors, destination, gen, inv_freq, kv, laid_out, misaligned, tol)

WIDE = (1, 1, 3, 576)  # rows of 288 / 576 lanes: more than one 256-thread block row


def case(id_, **kw):
    kw.setdefault("sms", 132)
    return pytest.param(kw, id=id_)


def _check(backend, got, expected, cpu_op_result, **tolerance):
    assert got.device.type == backend.device.type
    assert_close(got.cpu(), expected, **tolerance)
    if backend.name != "cpu":
        assert_close(got.cpu(), cpu_op_result, **tolerance)


def _shift(kind, tokens, g):
    if kind == "per_token":
        return torch.randint(-50, 5000, (tokens,), generator=g)
    return torch.tensor(37 if kind == "scalar" else int(kind))


def _content_and_anchors(c, seed, *, replace_pool=None):
    """The case's content and anchors on the CPU, and the same laid out as the
    case says (the op's arguments, still on the CPU). replace_pool(content,
    pool, g) may swap in anchors built from the content."""
    g = gen(seed)
    content = kv(c["shape"], c["dtype"], g)
    pool = anchors(c["shape"], c["dtype"], c["n"], g)
    if replace_pool is not None:
        pool = replace_pool(content, pool, g)
    args = (laid_out(content, c.get("layout", "contiguous")),
            [laid_out(a, c.get("anchor_layout", "contiguous")) for a in pool])
    return content, pool, args


# ---- rope_move -------------------------------------------------------------

ROPE = [
    case("f32-mqa-odd", dtype=F32, shape=MQA_ODD, shift="scalar", layout="contiguous"),
    case("bf16-gqa3-per-token", dtype=BF16, shape=GQA3_ODD, shift="per_token", layout="contiguous"),
    case("f16-d128-padded-per-token", dtype=F16, shape=HEADS8_D128, shift="per_token", layout="padded"),
    case("bf16-one-token", dtype=BF16, shape=ONE_TOKEN, shift="scalar", layout="contiguous"),
    case("f32-far-positions", dtype=F32, shape=(2, 2, 9, 128), shift=131000, layout="contiguous"),
    case("f16-many-rows-1sm", dtype=F16, shape=MANY_ROWS, shift="per_token", layout="contiguous", sms=1),
    case("f32-transposed", dtype=F32, shape=GQA3_ODD, shift="scalar", layout="transposed"),
    case("bf16-misaligned", dtype=BF16, shape=MQA_ODD, shift="per_token", layout="misaligned"),
    case("f32-d576-padded", dtype=F32, shape=WIDE, shift="scalar", layout="padded"),
    case("f16-no-tokens", dtype=F16, shape=EMPTY, shift="scalar", layout="contiguous"),
]


@pytest.mark.parametrize("c", ROPE)
def test_rope_move(backend, c):
    g = gen(1)
    keys, f = kv(c["shape"], c["dtype"], g), inv_freq(c["shape"][3])
    shift = _shift(c["shift"], c["shape"][2], g)
    backend.sms(c["sms"])
    got = backend.ops.rope_move(backend.to(laid_out(keys, c["layout"])), backend.to(f), backend.to(shift))
    assert got.shape == keys.shape and got.dtype == keys.dtype
    _check(backend, got, ref.rope_move(keys, f, shift), ops.rope_move(keys, f, shift), **tol(c["dtype"]))


ROPE_INPLACE = [
    case("f32-buffer-slice", dtype=F32, shift="scalar", layout="slice"),
    case("bf16-padded-per-token", dtype=BF16, shift="per_token", layout="padded"),
    case("f16-misaligned", dtype=F16, shift="scalar", layout="misaligned", sms=1),
    case("bf16-whole-tensor", dtype=BF16, shift="per_token", layout="contiguous"),
]


@pytest.mark.parametrize("c", ROPE_INPLACE)
def test_rope_move_inplace(backend, c):
    shape = (3, 2, 7, 64)
    g = gen(2)
    keys, f = kv(shape, c["dtype"], g), inv_freq(64)
    shift = _shift(c["shift"], shape[2], g)
    dst, buf, outside = destination(shape, c["dtype"], c["layout"], backend.device)
    dst.copy_(backend.to(keys))
    backend.sms(c["sms"])
    assert backend.ops.rope_move_(dst, backend.to(f), backend.to(shift)) is dst
    _check(backend, dst, ref.rope_move(keys, f, shift), ops.rope_move(keys, f, shift), **tol(c["dtype"]))
    assert not buf[outside].any(), "rope_move_ wrote outside its view"


def test_rope_move_round_trip_and_composition(backend):
    keys, f = kv((2, 3, 9, 128), F32, gen(3)), inv_freq(128)
    k, fb = backend.to(keys), backend.to(f)
    move = backend.ops.rope_move
    back = move(move(k, fb, 1234), fb, -1234)
    assert_close(back.cpu(), keys, atol=2e-4, rtol=1e-4)
    assert_close(move(move(k, fb, 20), fb, 17).cpu(), move(k, fb, 37).cpu(), atol=1e-4, rtol=1e-4)


# ---- value_distances -----------------------------------------------------

DISTANCES = [
    case("f32-1-anchor", dtype=F32, shape=MQA_ODD, n=1, rms=False),
    case("bf16-4-rms", dtype=BF16, shape=GQA3_ODD, n=4, rms=True),
    case("f16-20-anchors", dtype=F16, shape=HEADS8_D128, n=20, rms=False),
    case("bf16-40-anchors-rms", dtype=BF16, shape=ONE_TOKEN, n=40, rms=True),
    case("f32-many-rows-1sm", dtype=F32, shape=MANY_ROWS, n=5, rms=False, sms=1),
    case("f16-padded-9", dtype=F16, shape=GQA3_ODD, n=9, rms=True, layout="padded"),
    case("bf16-misaligned", dtype=BF16, shape=MQA_ODD, n=2, rms=False, layout="misaligned",
         anchor_layout="misaligned"),
    case("f32-transposed-anchors", dtype=F32, shape=HEADS8_D128, n=3, rms=False, anchor_layout="transposed"),
    case("f32-identical-anchor", dtype=F32, shape=(2, 2, 6, 64), n=2, rms=False, identical=True),
    case("f32-no-anchors", dtype=F32, shape=MQA_ODD, n=0, rms=False),
    case("bf16-no-tokens", dtype=BF16, shape=EMPTY, n=2, rms=True),
]


@pytest.mark.parametrize("c", DISTANCES)
def test_value_distances(backend, c):
    def identical_first(content, pool, g):  # anchor 0 starts with exactly the content
        return [torch.cat([content, kv(c["shape"], c["dtype"], g, extra_tokens=3)], dim=2)] + pool[1:]

    content, pool, args = _content_and_anchors(c, 5, replace_pool=identical_first if c.get("identical") else None)
    backend.sms(c["sms"])
    got = backend.ops.value_distances(*backend.to(args), c["rms"])
    assert got.shape == (c["n"],) and got.dtype == torch.float32
    _check(backend, got, ref.value_distances(content, pool, c["rms"]),
           ops.value_distances(content, pool, c["rms"]), **DISTANCE_TOL)
    if c.get("identical"):
        assert got[0] == 0 and got[1] > 0


# ---- match_decide --------------------------------------------------------

T_, F_ = True, False
DECIDE = [
    case("no-anchors", d=[], params=(1.0, 0.3, 0.9), share=False),
    case("one-anchor-never-shares", d=[0.0], params=(1.0, 0.3, 0.9), share=False),
    # One anchor far closer than the others: low entropy -> share, credit it.
    case("clearly-shares", d=[0.0, 10.0, 10.0], params=(1.0, 0.9, 0.9), share=True, credit=[T_, F_, F_]),
    case("clearly-shares-default-gate", d=[0.0, 30.0, 31.0], params=(1.0, 0.3, 0.9), share=True,
         credit=[T_, F_, F_]),
    # Two close anchors share the top-p mass: both credited.
    case("shares-credits-two", d=[0.0, 0.1, 40.0], params=(1.0, 0.9, 0.9), share=True, credit=[T_, T_, F_]),
    # All (nearly) equally close: entropy ~ log2(N) > gamma log2(N) -> new anchor.
    case("clearly-does-not-share", d=[2.0, 2.0, 2.0], params=(1.0, 0.3, 0.9), share=False),
    case("does-not-share-20", d=[0.01 * i for i in range(20)], params=(1.0, 0.3, 0.9), share=False),
    case("random-5", d="rand5", params=(5.0, 0.9, 0.5)),
    case("random-20-gamma0-top1", d="rand20", params=(0.5, 0.0, 1.0)),
    case("nan-never-shares", d=[0.0, float("nan"), 3.0], params=(1.0, 0.3, 0.9), share=False),
    case("inf-never-shares", d=[0.0, 40.0, float("inf")], params=(1.0, 0.9, 0.9), share=False),
    case("strided-distances", d=[0.0, 10.0, 10.0], params=(1.0, 0.9, 0.9), share=True, credit=[T_, F_, F_],
         strided=True),
]


@pytest.mark.parametrize("c", DECIDE)
def test_match_decide(backend, c):
    d = c["d"]
    if isinstance(d, str):
        n = int(d[4:])
        d = torch.rand(n, generator=gen(n)) * 4
    else:
        d = torch.tensor(d, dtype=torch.float32)
    tau, gamma, top_p = c["params"]
    arg = torch.stack([d, d], 1)[:, 0] if c.get("strided") else d
    got = backend.ops.match_decide(backend.to(arg), tau, gamma, top_p)
    want = ref.match_decide(d, tau, gamma, top_p)
    cpu = ops.match_decide(d, tau, gamma, top_p)
    assert all(t.device.type == backend.device.type for t in got)
    probs, entropy, share, credit = (t.cpu() for t in got)
    assert_close(probs, want[0], equal_nan=True)
    assert_close(entropy, want[1], atol=1e-5, rtol=1e-5, equal_nan=True)
    assert bool(share) == bool(want[2]) == bool(cpu[2])
    assert torch.equal(credit, want[3]) and torch.equal(credit, cpu[3])
    if "share" in c:
        assert bool(share) == c["share"]
    if "credit" in c:
        assert credit.tolist() == c["credit"]
    if not bool(share):
        assert not credit.any()


# ---- token_weights -------------------------------------------------------

TOKEN = [
    case("f32-1-anchor", dtype=F32, shape=MQA_ODD, n=1),
    case("bf16-4-padded", dtype=BF16, shape=GQA3_ODD, n=4, layout="padded"),
    case("f16-20-anchors", dtype=F16, shape=HEADS8_D128, n=20),
    case("bf16-40-anchors", dtype=BF16, shape=HEADS8_D128, n=40),
    case("f32-many-rows-1sm", dtype=F32, shape=MANY_ROWS, n=5, sms=1),
    case("f16-one-token-9", dtype=F16, shape=ONE_TOKEN, n=9),
    case("bf16-misaligned", dtype=BF16, shape=MQA_ODD, n=2, layout="misaligned", anchor_layout="misaligned"),
    case("f32-transposed-anchors", dtype=F32, shape=GQA3_ODD, n=3, anchor_layout="transposed"),
    case("f32-d576-padded", dtype=F32, shape=WIDE, n=2, layout="padded"),
    case("f32-no-anchors", dtype=F32, shape=MQA_ODD, n=0),
    case("f16-no-tokens", dtype=F16, shape=EMPTY, n=1),
]


@pytest.mark.parametrize("c", TOKEN)
def test_token_weights(backend, c):
    base, pool, args = _content_and_anchors(c, 7)
    backend.sms(c["sms"])
    got = backend.ops.token_weights(*backend.to(args), 0.7)
    T = c["shape"][2]
    assert got.shape == (c["n"], T) and got.dtype == torch.float32
    if c["n"] == 0 or T == 0:
        return
    _check(backend, got, ref.token_weights(base, pool, 0.7), ops.token_weights(base, pool, 0.7), **SCORE_TOL)
    assert_close(got.sum(0).cpu(), torch.ones(T))


# ---- segment_weights -----------------------------------------------------

SEGMENT = [
    case("f32-1-anchor", dtype=F32, shape=MQA_ODD, n=1),
    case("bf16-8-anchors", dtype=BF16, shape=GQA3_ODD, n=8),
    case("f16-20-anchors", dtype=F16, shape=HEADS8_D128, n=20),
    case("bf16-40-anchors", dtype=BF16, shape=ONE_TOKEN, n=40),
    case("f32-many-rows-1sm", dtype=F32, shape=MANY_ROWS, n=5, sms=1),
    case("f16-padded", dtype=F16, shape=GQA3_ODD, n=4, layout="padded"),
    case("bf16-misaligned", dtype=BF16, shape=MQA_ODD, n=2, layout="misaligned", anchor_layout="misaligned"),
    case("f32-anchor-ends-with-content", dtype=F32, shape=(2, 2, 4, 64), n=2, last_tokens=True),
    case("f32-no-anchors", dtype=F32, shape=MQA_ODD, n=0),
    case("bf16-no-tokens", dtype=BF16, shape=EMPTY, n=2),
]


@pytest.mark.parametrize("c", SEGMENT)
def test_segment_weights(backend, c):
    def ends_and_starts(base, pool, g):  # anchor 0 ends with the content, anchor 1 starts with it
        return [torch.cat([kv(c["shape"], c["dtype"], g, extra_tokens=-1), base], dim=2),
                torch.cat([base, kv(c["shape"], c["dtype"], g, extra_tokens=-1)], dim=2)]

    base, pool, args = _content_and_anchors(c, 8, replace_pool=ends_and_starts if c.get("last_tokens") else None)
    backend.sms(c["sms"])
    tau = 0.1 if c.get("last_tokens") else 2.0
    got = backend.ops.segment_weights(*backend.to(args), tau)
    L, H, T, D = c["shape"]
    assert got.shape == (c["n"], L, H, D) and got.dtype == torch.float32
    _check(backend, got, ref.segment_weights(base, pool, tau), ops.segment_weights(base, pool, tau),
           **SCORE_TOL)
    if c.get("last_tokens"):
        assert torch.all(got[0] > 0.99)


# ---- fused_offset / fused_offset_into ------------------------------------

OFFSET = [
    case("f32-0-deltas-keys", dtype=F32, shape=MQA_ODD, n=0, weights="token", keys=True),
    case("bf16-1-channel-keys", dtype=BF16, shape=GQA3_ODD, n=1, weights="channel", keys=True),
    case("f16-4-token-values", dtype=F16, shape=HEADS8_D128, n=4, weights="token", keys=False),
    case("bf16-20-channel-keys-padded-1sm", dtype=BF16, shape=HEADS8_D128, n=20, weights="channel", keys=True,
         layout="padded", dst="padded", sms=1),
    case("f32-40-token-keys", dtype=F32, shape=GQA3_ODD, n=40, weights="token", keys=True),
    case("f16-40-channel-values-padded", dtype=F16, shape=MQA_ODD, n=40, weights="channel", keys=False,
         layout="padded", dst="padded"),
    case("bf16-one-token-per-token-shift", dtype=BF16, shape=ONE_TOKEN, n=4, weights="token", keys=True,
         shift="per_token"),
    case("f32-many-rows-1sm-per-token-shift", dtype=F32, shape=MANY_ROWS, n=5, weights="token", keys=True,
         shift="per_token", sms=1),
    case("bf16-many-rows-1sm-channel-values", dtype=BF16, shape=MANY_ROWS, n=5, weights="channel", keys=False,
         sms=1),
    case("f32-d576-padded-keys", dtype=F32, shape=WIDE, n=2, weights="channel", keys=True, layout="padded"),
    case("f32-d576-padded-values", dtype=F32, shape=WIDE, n=2, weights="token", keys=False, layout="padded"),
    case("f16-misaligned-base", dtype=F16, shape=MQA_ODD, n=4, weights="token", keys=True, layout="misaligned"),
    case("bf16-one-misaligned-delta", dtype=BF16, shape=MQA_ODD, n=4, weights="channel", keys=True,
         one_delta="misaligned"),
    case("f32-misaligned-channel-weights", dtype=F32, shape=GQA3_ODD, n=4, weights="channel", keys=False,
         weights_layout="misaligned"),
    case("bf16-transposed-into-misaligned-dst", dtype=BF16, shape=GQA3_ODD, n=3, weights="token", keys=True,
         layout="transposed", dst="misaligned"),
    case("f32-in-place", dtype=F32, shape=GQA3_ODD, n=4, weights="token", keys=True, dst="in_place"),
    case("f16-in-place-values", dtype=F16, shape=HEADS8_D128, n=2, weights="channel", keys=False,
         dst="in_place"),
    case("bf16-no-tokens", dtype=BF16, shape=EMPTY, n=2, weights="token", keys=True),
]


@pytest.mark.parametrize("c", OFFSET)
def test_fused_offset(backend, c):
    g = gen(10)
    shape, dtype, n = c["shape"], c["dtype"], c["n"]
    L, H, T, D = shape
    base = kv(shape, dtype, g)
    deltas = anchors(shape, dtype, n, g)
    if c["weights"] == "token":
        w = torch.softmax(torch.randn(n, T, generator=g), 0)
    else:
        w = torch.softmax(torch.randn(n, L, H, D, generator=g), 0)
    f = inv_freq(D) if c["keys"] else None
    shift = _shift(c.get("shift", 123), T, g)
    expected = ref.fused_offset(base, deltas, w, shift, f)
    cpu = ops.fused_offset(base, deltas, w, shift, f)
    layout = c.get("layout", "contiguous")
    laid = [laid_out(d, "contiguous") for d in deltas]
    if "one_delta" in c:
        laid[len(laid) // 2] = laid_out(deltas[len(laid) // 2], c["one_delta"])
    elif layout in ("padded", "transposed"):
        laid = [laid_out(d, layout) for d in deltas]
    b, ds, wb, sb, fb = backend.to((laid_out(base, layout), laid, laid_out(w, c.get("weights_layout", "contiguous")),
                                    shift, f))
    backend.sms(c["sms"])
    got = backend.ops.fused_offset(b, ds, wb, sb, fb)
    assert got.shape == shape and got.dtype == dtype
    _check(backend, got, expected, cpu, **tol(dtype))
    # Into a view: a slice of a [L, H, Tmax, D] buffer unless the case says.
    where = c.get("dst", "slice")
    if where == "in_place":
        dst, buf, outside = b, b, torch.zeros(b.shape, dtype=torch.bool)
    else:
        dst, buf, outside = destination(shape, dtype, where, backend.device)
    assert backend.ops.fused_offset_into(dst, b, ds, wb, sb, fb) is dst
    _check(backend, dst, expected, cpu, **tol(dtype))
    assert not buf[outside].any(), "fused_offset_into wrote outside dst"


def test_fused_offset_leaves_layer0_without_offset(backend):
    g = gen(11)
    base, deltas = kv((3, 2, 5, 64), F32, g), anchors((3, 2, 5, 64), F32, 2, g)
    w, f = torch.full((2, 5), 0.5), inv_freq(64)
    b, ds, wb, fb = backend.to((base, deltas, w, f))
    out = backend.ops.fused_offset(b, ds, wb, 9, fb).cpu()
    moved = ops.rope_move(base, f, 9)
    assert_close(out[0], moved[0])
    assert not torch.allclose(out[1], moved[1])


def test_misaligned_fixture_is_misaligned():
    # The layouts the cases rely on are what they claim.
    x = torch.zeros(2, 2, 3, 64, dtype=BF16)
    assert misaligned(x).data_ptr() % 16 != 0
