"""Bad inputs to the ops raise errors that name the argument and the problem."""
from __future__ import annotations

import pytest
import torch

from kvcomm import ops
from op_cases import inv_freq

K = torch.zeros(2, 3, 5, 64)
F = inv_freq(64)
A = [torch.zeros(2, 3, 6, 64)]

CASES = [
    ("rope_move 3-D keys", lambda: ops.rope_move(K[0], F, 1), r"keys must be \[layers, kv_heads, tokens, head_dim\]"),
    ("rope_move int keys", lambda: ops.rope_move(K.int(), F, 1), "keys must be float32, bfloat16 or float16"),
    ("rope_move inv_freq size", lambda: ops.rope_move(K, inv_freq(32), 1), r"inv_freq must be \[head_dim/2\] = \[32\]"),
    ("rope_move inv_freq dtype", lambda: ops.rope_move(K, F.double(), 1), "inv_freq must be float32"),
    ("rope_move odd head_dim", lambda: ops.rope_move(torch.zeros(1, 1, 2, 5), F, 1), "head_dim must be even"),
    ("rope_move shift dtype", lambda: ops.rope_move(K, F, torch.tensor(1.0)), "shift must be int64"),
    ("rope_move shift length", lambda: ops.rope_move(K, F, torch.arange(4)), r"shift must be \[\] \(one shift\) or \[tokens\] = \[5\]"),
    ("distances layers", lambda: ops.value_distances(K, [torch.zeros(3, 3, 6, 64)]), r"anchors\[0\] has shape"),
    ("distances short anchor", lambda: ops.value_distances(K, [torch.zeros(2, 3, 4, 64)]), r"anchors\[0\] has 4 tokens, fewer than the content's 5"),
    ("distances dtype", lambda: ops.value_distances(K, [A[0].half()]), r"anchors\[0\] is Half but the content is Float"),
    ("decide 2-D", lambda: ops.match_decide(torch.zeros(2, 2)), r"distances must be \[N\]"),
    ("decide dtype", lambda: ops.match_decide(torch.zeros(2, dtype=torch.float64)), "distances must be float32"),
    ("decide tau", lambda: ops.match_decide(torch.zeros(2), tau=0.0), "tau must be > 0"),
    ("decide top_p", lambda: ops.match_decide(torch.zeros(2), top_p=0.0), r"top_p must be in \(0, 1\]"),
    ("decide gamma", lambda: ops.match_decide(torch.zeros(2), gamma=-0.1), "gamma must be >= 0"),
    ("token weights tau", lambda: ops.token_weights(K, A, -1.0), "tau must be > 0"),
    ("segment weights heads", lambda: ops.segment_weights(K, [torch.zeros(2, 1, 6, 64)]), r"anchors\[0\] has shape"),
    ("offset weights shape", lambda: ops.fused_offset(K, A, torch.zeros(1, 4), 0, F), r"per-token weights must be \[num_deltas, tokens\] = \[1, 5\]"),
    ("offset weights rank", lambda: ops.fused_offset(K, A, torch.zeros(1, 2, 3), 0, F), "weights must be"),
    ("offset weights dtype", lambda: ops.fused_offset(K, A, torch.zeros(1, 5, dtype=torch.float16), 0, F), "weights must be float32"),
    ("offset delta dtype", lambda: ops.fused_offset(K, [A[0].bfloat16()], torch.zeros(1, 5), 0, F), r"deltas\[0\] is BFloat16"),
    ("offset dst shape", lambda: ops.fused_offset_into(torch.zeros(2, 3, 4, 64), K, A, torch.zeros(1, 5), 0, F), "dst has shape"),
    ("offset dst dtype", lambda: ops.fused_offset_into(K.half(), K, A, torch.zeros(1, 5), 0, F), "dst is Half but base is Float"),
]


@pytest.mark.parametrize("name,call,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(name, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_errors_name_the_op():
    with pytest.raises(RuntimeError, match=r"kvcomm\.fused_offset: "):
        ops.fused_offset(K, A, torch.zeros(1, 4), 0, F)
