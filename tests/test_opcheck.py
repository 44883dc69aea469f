"""torch.library.opcheck for every op (schema, fake kernel, autograd
registration, dynamic shapes), and torch.compile(fullgraph=True) over them."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kvcomm import ops
from op_cases import inv_freq

_ops = torch.ops.kvcomm


def _inputs(dtype=torch.float32, L=2, H=3, T=5, D=64, n=3):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(L, H, T, D, generator=g).to(dtype)
    anchors = [torch.randn(L, H, T + i, D, generator=g).to(dtype) for i in range(n)]
    return base, anchors


def cases():
    for dtype in (torch.float32, torch.bfloat16):
        base, anchors = _inputs(dtype)
        f = inv_freq(64)
        shift = torch.tensor(7)
        tw = torch.softmax(torch.randn(3, 5), 0)
        cw = torch.softmax(torch.randn(3, 2, 3, 64), 0)
        yield _ops.rope_move, (base, f, shift)
        yield _ops.rope_move, (base, f, torch.arange(5))
        yield _ops.rope_move_, (base.clone(), f, shift)
        yield _ops.value_distances, (base, anchors, False)
        yield _ops.value_distances, (base, anchors, True)
        yield _ops.token_weights, (base, anchors, 1.0)
        yield _ops.segment_weights, (base, anchors, 1.0)
        yield _ops.fused_offset, (base, anchors, tw, shift, f)
        yield _ops.fused_offset, (base, anchors, cw, shift, None)
        yield _ops.fused_offset_into, (torch.empty_like(base), base, anchors, tw, shift, f)
    yield _ops.match_decide, (torch.tensor([0.5, 3.0, 9.0]), 1.0, 0.3, 0.9)


CASES = list(cases())


@pytest.mark.parametrize("op,args", CASES, ids=[f"{c[0]._qualified_op_name}-{i}" for i, c in enumerate(CASES)])
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_every_schema_is_opchecked():
    covered = {c[0]._qualified_op_name.split("::")[-1] for c in CASES}
    declared = {name for name in dir(_ops) if not name.startswith("_") and name != "name"}
    declared = {n for n in declared if isinstance(getattr(_ops, n), torch._ops.OpOverloadPacket)}
    assert declared == covered, f"ops without an opcheck case: {declared - covered}"


def _pipeline(content_v, base_k, anchor_v, anchor_k, deltas, f, dst):
    d = ops.value_distances(content_v, anchor_v)
    probs, entropy, share, credit = ops.match_decide(d, 1.0, 0.3, 0.9)
    tw = ops.token_weights(base_k, anchor_k)
    sw = ops.segment_weights(base_k, anchor_k)
    moved = ops.rope_move(base_k, f, 3)
    out = ops.fused_offset(base_k, deltas, tw, 3, f)
    ops.fused_offset_into(dst, base_k, deltas, tw, 3, f)
    return probs, entropy, share, credit, sw, moved, out


def test_torch_compile_fullgraph_matches_eager():
    base, anchors = _inputs()
    f = inv_freq(64)
    args = (base, base * 0.5, anchors, [a * 2 for a in anchors], anchors, f)
    eager = _pipeline(*args, torch.empty_like(base))
    compiled_dst = torch.empty_like(base)
    compiled = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")(*args, compiled_dst)
    for a, b in zip(eager, compiled):
        assert_close(a, b)
    assert_close(compiled_dst, eager[-1])
