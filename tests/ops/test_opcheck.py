"""torch.library.opcheck for every op (schema, fake kernel, autograd
registration, dynamic shapes) and torch.compile(fullgraph=True) over a
pipeline of all of them, on the CPU and on CUDA. (The host emulation registers
torch.ops.kvcomm_emu, which has no fake kernels: nothing to check there.)"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from backends import HAS_CUDA, NO_CUDA, schemas
from kvcomm import ops
from op_cases import inv_freq

_ops = torch.ops.kvcomm
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA))]


def cases(device):
    """Every op once in float32, and the ones with a vector/strided or
    dtype-dependent path again in bfloat16."""
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        base = torch.randn(2, 3, 5, 64, generator=g).to(dtype).to(device)
        anchors = [torch.randn(2, 3, 5 + i, 64, generator=g).to(dtype).to(device) for i in range(3)]
        f = inv_freq(64).to(device)
        shift = torch.tensor(7, device=device)
        tw = torch.softmax(torch.randn(3, 5, generator=g), 0).to(device)
        cw = torch.softmax(torch.randn(3, 2, 3, 64, generator=g), 0).to(device)
        yield _ops.rope_move, (base, f, shift)
        yield _ops.value_distances, (base, anchors, dtype == torch.bfloat16)
        yield _ops.fused_offset, (base, anchors, tw, shift, f)
        yield _ops.token_spread, (anchors, tw)
        if dtype == torch.float32:
            yield _ops.rope_move, (base, f, torch.arange(5, device=device))
            yield _ops.rope_move_, (base.clone(), f, shift)
            yield _ops.token_weights, (base, anchors, 1.0)
            yield _ops.segment_weights, (base, anchors, 1.0)
            yield _ops.fused_offset, (base, anchors, cw, shift, None)
            yield _ops.fused_offset_into, (torch.empty_like(base), base, anchors, tw, shift, f)
            yield _ops.match_decide, (torch.tensor([0.5, 3.0, 9.0], device=device), 1.0, 0.3, 0.9)


N_CASES = len(list(cases("cpu")))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(N_CASES))
def test_opcheck(device, i):
    op, args = list(cases(device))[i]
    torch.library.opcheck(op, args)


def test_every_schema_is_opchecked():
    covered = {c[0]._qualified_op_name.split("::")[-1] for c in cases("cpu")}
    assert covered == set(schemas()), f"ops without an opcheck case: {set(schemas()) - covered}"


def _pipeline(content_v, base_k, anchor_v, anchor_k, deltas, f, dst):
    d = ops.value_distances(content_v, anchor_v)
    probs, entropy, share, credit = ops.match_decide(d, 1.0, 0.3, 0.9)
    tw = ops.token_weights(base_k, anchor_k)
    sw = ops.segment_weights(base_k, anchor_k)
    moved = ops.rope_move(base_k, f, 3)
    out = ops.fused_offset(base_k, deltas, tw, 3, f)
    ops.fused_offset_into(dst, base_k, deltas, tw, 3, f)
    return probs, entropy, share, credit, sw, moved, out


@pytest.mark.parametrize("device,compiler", [
    ("cpu", "aot_eager"),
    pytest.param("cuda", "aot_eager", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)),
    pytest.param("cuda", "inductor", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)),
])
def test_torch_compile_fullgraph_matches_eager(device, compiler):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 5, 64, generator=g).to(device)
    anchors = [torch.randn(2, 3, 5 + i, 64, generator=g).to(device) for i in range(3)]
    f = inv_freq(64).to(device)
    args = (base, base * 0.5, anchors, [a * 2 for a in anchors], anchors, f)
    eager = _pipeline(*args, torch.empty_like(base))
    dst = torch.empty_like(base)
    compiled = torch.compile(_pipeline, fullgraph=True, backend=compiler)(*args, dst)
    for a, b in zip(eager, compiled):
        assert b.device.type == device
        assert_close(a, b)
    assert_close(dst, eager[-1])
