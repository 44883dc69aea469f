"""The ops on compact anchors and deltas: int8 / float8_e4m3fn codes with one float32
scale tensor [L, H, 1, D] each (anchor_scales / delta_scales), decoded in the kernels'
registers. One body per op over the `backend` fixture (cpu / emulated / cuda), each
compared with the pure-torch reference on the decoded values and, off the CPU, with
the CPU op; plus every fp8 code decoded exactly, the argument errors, and opcheck.

Cases reach the compact branches of the CUDA launchers (cuda/launchers.cuh): the
vector path (16 codes per load, head_dim a multiple of 16, 16-byte aligned codes and
scales) and the strided path (head_dim 40, padded / misaligned / transposed codes),
one and several launches of kCompactChunk (8) anchors, and a fused offset with more
deltas than the kernel-parameter tables hold (device tables of views and scales).
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kvcomm import ops
from kvcomm import reference as ref
from backends import backend, emu  # noqa: F401  (fixtures)
from op_cases import BF16, F16, F32, GQA3_ODD, HEADS8_D128, MQA_ODD, gen, inv_freq, kv, laid_out, tol

FP8 = torch.float8_e4m3fn
STORAGE = {torch.int8: "int8", FP8: "fp8"}
D40 = (2, 2, 9, 40)  # head_dim not a multiple of 16: the strided path


def case(id_, **kw):
    kw.setdefault("sms", 132)
    kw.setdefault("layout", "contiguous")
    return pytest.param(kw, id=id_)


def compact(t: torch.Tensor, code: torch.dtype, layout: str = "contiguous"):
    """(codes laid out as asked, scales) of t, as the anchor pool stores it."""
    data, scale = ref.compact_anchor(t, STORAGE[code])
    as_bytes = laid_out(data.view(torch.int8), layout)
    return as_bytes.view(code), scale


def _pool(c, seed):
    """The case's content and compact anchors (codes, scales), on the CPU."""
    g = gen(seed)
    content = kv(c["shape"], c["dtype"], g)
    dense = [kv(c["shape"], c["dtype"], g, extra_tokens=i % 3) for i in range(c["n"])]
    pairs = [compact(a, c["code"], c["layout"]) for a in dense]
    return content, [p[0] for p in pairs], [p[1] for p in pairs]


def _check(backend, got, expected, cpu_result, **tolerance):
    assert got.device.type == backend.device.type
    assert_close(got.cpu(), expected, **tolerance)
    if backend.name != "cpu":
        assert_close(got.cpu(), cpu_result, **tolerance)


SCORES = [
    case("int8-f32-1", code=torch.int8, dtype=F32, shape=MQA_ODD, n=1),
    case("fp8-bf16-4", code=FP8, dtype=BF16, shape=GQA3_ODD, n=4),
    case("int8-f16-8-one-chunk", code=torch.int8, dtype=F16, shape=HEADS8_D128, n=8),
    case("fp8-f32-9-two-chunks", code=FP8, dtype=F32, shape=HEADS8_D128, n=9),
    case("int8-bf16-20-1sm", code=torch.int8, dtype=BF16, shape=GQA3_ODD, n=20, sms=1),
    case("int8-f32-d40-strided", code=torch.int8, dtype=F32, shape=D40, n=3),
    case("fp8-f16-padded", code=FP8, dtype=F16, shape=MQA_ODD, n=3, layout="padded"),
    case("int8-bf16-misaligned", code=torch.int8, dtype=BF16, shape=GQA3_ODD, n=2, layout="misaligned"),
    case("fp8-f32-transposed", code=FP8, dtype=F32, shape=HEADS8_D128, n=2, layout="transposed"),
]


@pytest.mark.parametrize("c", SCORES)
def test_value_distances(backend, c):
    content, codes, scales = _pool(c, 1)
    backend.sms(c["sms"])
    for rms in (False, True):
        got = backend.ops.value_distances(backend.to(content), backend.to(codes), rms,
                                          anchor_scales=backend.to(scales))
        assert got.shape == (c["n"],) and got.dtype == torch.float32
        _check(backend, got, ref.value_distances(content, codes, rms, anchor_scales=scales),
               ops.value_distances(content, codes, rms, anchor_scales=scales), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("c", SCORES)
def test_token_and_segment_weights(backend, c):
    content, codes, scales = _pool(c, 2)
    backend.sms(c["sms"])
    args = (backend.to(content), backend.to(codes), 0.5)
    tw = backend.ops.token_weights(*args, anchor_scales=backend.to(scales))
    _check(backend, tw, ref.token_weights(content, codes, 0.5, anchor_scales=scales),
           ops.token_weights(content, codes, 0.5, anchor_scales=scales), atol=1e-5, rtol=1e-4)
    sw = backend.ops.segment_weights(*args, anchor_scales=backend.to(scales))
    _check(backend, sw, ref.segment_weights(content, codes, 0.5, anchor_scales=scales),
           ops.segment_weights(content, codes, 0.5, anchor_scales=scales), atol=1e-5, rtol=1e-4)


OFFSETS = [
    case("int8-f32-keys-token", code=torch.int8, dtype=F32, shape=HEADS8_D128, n=3, keys=True, per="token"),
    case("fp8-bf16-values-channel", code=FP8, dtype=BF16, shape=GQA3_ODD, n=4, keys=False, per="channel"),
    case("int8-f16-keys-channel-1sm", code=torch.int8, dtype=F16, shape=HEADS8_D128, n=2, keys=True,
         per="channel", sms=1),
    # head_dim 64 keys: a rotate-half span of 32 channels, two 16-code vectors.
    case("fp8-f32-keys-d64", code=FP8, dtype=F32, shape=MQA_ODD, n=5, keys=True, per="token"),
    case("int8-bf16-d40-keys-strided", code=torch.int8, dtype=BF16, shape=D40, n=2, keys=True, per="token"),
    case("fp8-f16-padded-values", code=FP8, dtype=F16, shape=GQA3_ODD, n=3, keys=False, per="token",
         layout="padded"),
    case("int8-f32-40-deltas-device-table", code=torch.int8, dtype=F32, shape=MQA_ODD, n=40, keys=True,
         per="channel"),
    case("fp8-bf16-33-deltas-values", code=FP8, dtype=BF16, shape=(3, 2, 4, 32), n=33, keys=False,
         per="token"),
]


@pytest.mark.parametrize("c", OFFSETS)
def test_fused_offset(backend, c):
    base, codes, scales = _pool(c, 3)
    L, H, T, D = c["shape"]
    g = gen(4)
    if c["per"] == "token":
        weights = torch.softmax(torch.randn(c["n"], T, generator=g), 0)
    else:
        weights = torch.softmax(torch.randn(c["n"], L, H, D, generator=g), 0)
    f = inv_freq(D) if c["keys"] else None
    shift = 29
    backend.sms(c["sms"])
    want = ref.fused_offset(base, codes, weights, shift, f, delta_scales=scales)
    cpu = ops.fused_offset(base, codes, weights, shift, f, delta_scales=scales)
    got = backend.ops.fused_offset(backend.to(base), backend.to(codes), backend.to(weights), shift,
                                   backend.to(f), delta_scales=backend.to(scales))
    _check(backend, got, want, cpu, **tol(c["dtype"]))
    dst = torch.zeros_like(backend.to(base))
    backend.ops.fused_offset_into(dst, backend.to(base), backend.to(codes), backend.to(weights), shift,
                                  backend.to(f), delta_scales=backend.to(scales))
    _check(backend, dst, want, cpu, **tol(c["dtype"]))


@pytest.mark.parametrize("content_dtype", [F32, F16])
def test_every_fp8_code_decodes_exactly(backend, content_dtype):
    """One delta holding all 256 e4m3 codes (NaN codes included), scale 1 and weight 1
    on a zero base: layer 1 of the result is each code's value, exactly as torch
    converts it (in the content's dtype; float16 holds every finite e4m3 value)."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).reshape(1, 1, 16, 16).expand(2, 1, 16, 16)
    codes = codes.contiguous()
    scale = torch.ones(2, 1, 1, 16)
    base = torch.zeros(2, 1, 16, 16, dtype=content_dtype)
    got = backend.ops.fused_offset(backend.to(base), [backend.to(codes)], backend.to(torch.ones(1, 16)), 0,
                                   None, delta_scales=[backend.to(scale)]).cpu()
    want = codes[1].to(torch.float32).to(content_dtype)
    assert torch.equal(got[1].isnan(), want.isnan()) and int(want.isnan().sum()) == 2
    assert torch.equal(got[1].nan_to_num(), want.nan_to_num())
    assert not got[0].any(), "layer 0 never gets deltas"


def test_int8_and_fp8_read_the_values_the_dense_ops_read():
    """On float32 content a compact op equals the plain op on the decoded float32 anchors
    (the same values, read two ways)."""
    g = gen(7)
    content = kv(HEADS8_D128, F32, g)
    for code in (torch.int8, FP8):
        pairs = [compact(kv(HEADS8_D128, F32, g, extra_tokens=1), code) for _ in range(3)]
        codes, scales = [p[0] for p in pairs], [p[1] for p in pairs]
        decoded = [ref.expand_anchor(c, s, F32) for c, s in pairs]
        assert_close(ops.value_distances(content, codes, anchor_scales=scales),
                     ops.value_distances(content, decoded), atol=1e-5, rtol=1e-5)
        assert_close(ops.token_weights(content, codes, 1.0, anchor_scales=scales),
                     ops.token_weights(content, decoded, 1.0), atol=1e-6, rtol=1e-5)
        w = torch.softmax(torch.randn(3, 5, generator=g), 0)
        assert_close(ops.fused_offset(content, codes, w, 3, inv_freq(128), delta_scales=scales),
                     ops.fused_offset(content, decoded, w, 3, inv_freq(128)), atol=2e-5, rtol=2e-5)


# ---- bad compact arguments -------------------------------------------------

def _good():
    g = gen(9)
    content = kv(MQA_ODD, F32, g)
    codes, scale = compact(kv(MQA_ODD, F32, g), torch.int8)
    return content, codes, scale


@pytest.mark.parametrize("mutate, match", [
    (lambda c, s: ([c, c], [s]), r"anchors has 2 tensors but 1 scale tensors"),
    (lambda c, s: ([c.to(torch.float16)], [s]), r"anchors\[0\] is Half; with scales, anchors must be int8 or "
                                                r"float8_e4m3fn"),
    (lambda c, s: ([c, c.to(torch.float32).to(FP8)], [s, s]), r"anchors\[1\] is Float8_e4m3fn but anchors\[0\] "
                                                             r"is Char"),
    (lambda c, s: ([c], [s.to(torch.float16)]), r"anchors scale \[0\] must be float32"),
    (lambda c, s: ([c], [s.expand(2, 1, 3, 64)]), r"anchors scale \[0\] must be \[layers, kv_heads, 1, "
                                                  r"head_dim\] = \[2, 1, 1, 64\]"),
    (lambda c, s: ([c[:, :, :3]], [s]), r"anchors\[0\] has 3 tokens, fewer than the content's 7"),
    (lambda c, s: ([c[:1]], [s]), r"anchors\[0\] has shape \[1, 1, 7, 64\] but the content is \[2, 1, 7, 64\]"),
])
def test_compact_argument_errors_name_what_is_wrong(mutate, match):
    content, codes, scale = _good()
    anchors, scales = mutate(codes, scale)
    with pytest.raises(RuntimeError, match=r"kvcomm\.value_distances: " + match):
        ops.value_distances(content, anchors, anchor_scales=scales)
    with pytest.raises(RuntimeError, match=r"kvcomm\.token_weights: " + match):
        ops.token_weights(content, anchors, anchor_scales=scales)
    w = torch.ones(len(anchors), content.shape[2])
    with pytest.raises(RuntimeError, match=r"kvcomm\.fused_offset: " + match.replace("anchors", "deltas")):
        ops.fused_offset(content, anchors, w, 0, delta_scales=scales)


def test_codes_without_scales_are_refused():
    content, codes, _ = _good()
    with pytest.raises(RuntimeError, match=r"kvcomm\.value_distances: anchors\[0\] (must be float32|is Char)"):
        ops.value_distances(content, [codes])


def test_emulated_launch_errors_match_the_cpu(emu):
    from backends import EmulatedOps
    content, codes, scale = _good()
    with pytest.raises(RuntimeError, match=r"kvcomm\.token_weights: anchors has 1 tensors but 2 scale"):
        EmulatedOps(emu).token_weights(content, [codes], 1.0, anchor_scales=[scale, scale])


# ---- opcheck ---------------------------------------------------------------

def _opcheck_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _opcheck_devices())
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "fp8"])
def test_opcheck_compact(device, code):
    g = gen(11)
    content = kv((2, 2, 5, 32), BF16, g).to(device)
    pairs = [compact(kv((2, 2, 5, 32), BF16, g, extra_tokens=2), code) for _ in range(3)]
    codes = [p[0].to(device) for p in pairs]
    scales = [p[1].to(device) for p in pairs]
    w = torch.softmax(torch.randn(3, 5, generator=g), 0).to(device)
    shift = torch.tensor(4, device=device)
    f = inv_freq(32).to(device)
    k = torch.ops.kvcomm
    # torch's test_schema perturbs every input with a multiply, which torch has no
    # float8 kernel for; the other checks (fake kernel, autograd registration, AOT
    # dispatch) run for fp8 too.
    utils = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if code != FP8:
        utils.append("test_schema")
    check = lambda op, args: torch.library.opcheck(op, args, test_utils=utils)  # noqa: E731
    check(k.value_distances.default, (content, codes, False, scales))
    check(k.token_weights.default, (content, codes, 1.0, scales))
    check(k.segment_weights.default, (content, codes, 1.0, scales))
    check(k.fused_offset.default, (content, codes, w, shift, f, scales))
    check(k.fused_offset_into.default, (torch.empty_like(content), content, codes, w, shift, f, scales))
