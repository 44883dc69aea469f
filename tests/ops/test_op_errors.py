"""Bad inputs raise errors that name the op, the argument and the problem, on
every backend (the checks are shared: cpp/op_checks.cpp), including the
overlap checks of the ops that write into a caller's tensor: dst (or
rope_move_'s keys) may not share memory with anything the op reads, except
that base may be dst itself (in place)."""
from __future__ import annotations

import pytest
import torch

from backends import backend, emu  # noqa: F401  (fixtures)
from op_cases import inv_freq

K = torch.zeros(2, 3, 5, 64)
F = inv_freq(64)
A = [torch.zeros(2, 3, 6, 64)]
W = torch.zeros(1, 5)

# (name, call(ops, to), message regex): `to` puts a tensor on the backend's device.
CASES = [
    ("rope_move 3-D keys", lambda o, t: o.rope_move(t(K[0]), t(F), 1),
     r"keys must be \[layers, kv_heads, tokens, head_dim\]"),
    ("rope_move int keys", lambda o, t: o.rope_move(t(K.int()), t(F), 1), "keys must be float32, bfloat16 or float16"),
    ("rope_move inv_freq size", lambda o, t: o.rope_move(t(K), t(inv_freq(32)), 1),
     r"inv_freq must be \[head_dim/2\] = \[32\]"),
    ("rope_move inv_freq dtype", lambda o, t: o.rope_move(t(K), t(F.double()), 1), "inv_freq must be float32"),
    ("rope_move odd head_dim", lambda o, t: o.rope_move(t(torch.zeros(1, 1, 2, 5)), t(F), 1), "head_dim must be even"),
    ("rope_move shift dtype", lambda o, t: o.rope_move(t(K), t(F), t(torch.tensor(1.0))), "shift must be int64"),
    ("rope_move shift length", lambda o, t: o.rope_move(t(K), t(F), t(torch.arange(4))),
     r"shift must be \[\] \(one shift\) or \[tokens\] = \[5\]"),
    ("distances layers", lambda o, t: o.value_distances(t(K), [t(torch.zeros(3, 3, 6, 64))]), r"anchors\[0\] has shape"),
    ("distances short anchor", lambda o, t: o.value_distances(t(K), [t(torch.zeros(2, 3, 4, 64))]),
     r"anchors\[0\] has 4 tokens, fewer than the content's 5"),
    ("distances dtype", lambda o, t: o.value_distances(t(K), [t(A[0].half())]),
     r"anchors\[0\] is Half but the content is Float"),
    ("decide 2-D", lambda o, t: o.match_decide(t(torch.zeros(2, 2))), r"distances must be \[N\]"),
    ("decide dtype", lambda o, t: o.match_decide(t(torch.zeros(2, dtype=torch.float64))), "distances must be float32"),
    ("decide tau", lambda o, t: o.match_decide(t(torch.zeros(2)), tau=0.0), "tau must be > 0"),
    ("decide top_p", lambda o, t: o.match_decide(t(torch.zeros(2)), top_p=0.0), r"top_p must be in \(0, 1\]"),
    ("decide gamma", lambda o, t: o.match_decide(t(torch.zeros(2)), gamma=-0.1), "gamma must be >= 0"),
    ("token weights tau", lambda o, t: o.token_weights(t(K), t(A), -1.0), "tau must be > 0"),
    ("segment weights heads", lambda o, t: o.segment_weights(t(K), [t(torch.zeros(2, 1, 6, 64))]),
     r"anchors\[0\] has shape"),
    ("offset weights shape", lambda o, t: o.fused_offset(t(K), t(A), t(torch.zeros(1, 4)), 0, t(F)),
     r"per-token weights must be \[num_deltas, tokens\] = \[1, 5\]"),
    ("offset weights rank", lambda o, t: o.fused_offset(t(K), t(A), t(torch.zeros(1, 2, 3)), 0, t(F)),
     "weights must be"),
    ("offset weights dtype", lambda o, t: o.fused_offset(t(K), t(A), t(torch.zeros(1, 5, dtype=torch.float16)), 0, t(F)),
     "weights must be float32"),
    ("offset delta dtype", lambda o, t: o.fused_offset(t(K), [t(A[0].bfloat16())], t(W), 0, t(F)),
     r"deltas\[0\] is BFloat16"),
    ("offset dst shape", lambda o, t: o.fused_offset_into(t(torch.zeros(2, 3, 4, 64)), t(K), t(A), t(W), 0, t(F)),
     "dst has shape"),
    ("offset dst dtype", lambda o, t: o.fused_offset_into(t(K.half()), t(K), t(A), t(W), 0, t(F)),
     "dst is Half but base is Float"),
    ("offset dst expanded", lambda o, t: o.fused_offset_into(t(torch.zeros(2, 1, 5, 64)).expand(2, 3, 5, 64), t(K),
                                                             t(A), t(W), 0, t(F)),
     "dst has overlapping memory"),
]


def _buffer_cases():
    """Overlaps between dst and an input, each a view into one buffer."""
    def buf():
        return torch.zeros(2, 3, 20, 64)

    def shifted_base(o, t):  # dst = tokens 1..8, base = tokens 0..7: each row read after it was written
        b = t(buf())
        return o.fused_offset_into(b[:, :, 1:8], b[:, :, 0:7], [], t(torch.zeros(0, 7)), 3, t(F))

    def delta_is_dst(o, t):  # dst = tokens 0..7 = the tokens of deltas[0] the op reads
        b = t(buf())
        return o.fused_offset_into(b[:, :, 0:7], t(torch.zeros(2, 3, 7, 64)), [b[:, :, 0:9]],
                                   t(torch.zeros(1, 7)), 3, t(F))

    def delta_overlaps(o, t):  # dst = tokens 2..7, deltas[1] reads tokens 0..5 of the same buffer
        b = t(buf())
        base = t(torch.zeros(2, 3, 5, 64))
        return o.fused_offset_into(b[:, :, 2:7], base, [t(torch.zeros(2, 3, 5, 64)), b[:, :, 0:5]],
                                   t(torch.zeros(2, 5)), 3, t(F))

    def weights_overlap(o, t):  # float32 weights living inside the float32 dst
        b = t(torch.zeros(2 * 3 * 5 * 64))
        return o.fused_offset_into(b.view(2, 3, 5, 64), t(K), t(A), b[:5].view(1, 5), 3, t(F))

    def interleaved_channels(o, t):  # dst = even channels 0..58, base = even channels 2..60
        b = t(buf())
        return o.fused_offset_into(b[..., 0:60:2], b[..., 2:62:2], [], t(torch.zeros(0, 20)), 3, None)

    def rope_keys_over_inv_freq(o, t):  # keys (float32) overlap inv_freq
        b = t(torch.zeros(64))
        return o.rope_move_(b.view(1, 1, 1, 64), b[:32], 3)

    def rope_keys_over_shift(o, t):  # keys overlap the int64 shift (a float32 view of the same bytes)
        s = t(torch.zeros(8, dtype=torch.int64))
        return o.rope_move_(s.view(torch.float32).view(1, 1, 1, 16), t(inv_freq(16)), s[:1].view(()))

    return [
        ("overlap base partially", shifted_base, r"kvcomm\.fused_offset_into: dst overlaps base in memory"),
        ("overlap delta", delta_overlaps, r"dst overlaps deltas\[1\] in memory"),
        ("dst is a delta", delta_is_dst, r"dst overlaps deltas\[0\] in memory"),
        ("overlap weights", weights_overlap, r"dst overlaps weights in memory"),
        ("overlap interleaved channels", interleaved_channels, r"dst overlaps base in memory"),
        ("keys overlap inv_freq", rope_keys_over_inv_freq, r"kvcomm\.rope_move_: keys overlaps inv_freq in memory"),
        ("keys overlap shift", rope_keys_over_shift, r"keys overlaps shift in memory"),
    ]


CASES += _buffer_cases()


@pytest.mark.parametrize("name,call,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(backend, name, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(backend.ops, backend.to)


def test_errors_name_the_op(backend):
    with pytest.raises(RuntimeError, match=r"kvcomm\.fused_offset: "):
        backend.ops.fused_offset(backend.to(K), backend.to(A), backend.to(torch.zeros(1, 4)), 0, backend.to(F))


def test_overlap_message_says_how_to_work_in_place(backend):
    b = backend.to(torch.zeros(2, 3, 20, 64))
    with pytest.raises(RuntimeError, match="to work in place, pass the very same view as dst and as base"):
        backend.ops.fused_offset_into(b[:, :, 1:8], b[:, :, 0:7], [], backend.to(torch.zeros(0, 7)), 3,
                                      backend.to(F))


# Views of one buffer that do not share an element are not overlaps: these
# must run (and match the reference).
APART = [
    ("token ranges of one cache", lambda b: (b[:, :, 10:17], b[:, :, 0:7])),
    ("channel halves", lambda b: (b[..., :32], b[..., 32:])),
    ("even and odd channels", lambda b: (b[..., 0::2], b[..., 1::2])),
    ("in place, the same view", lambda b: (b[:, :, 2:9], b[:, :, 2:9])),
]


@pytest.mark.parametrize("name,views", APART, ids=[a[0] for a in APART])
def test_disjoint_views_of_one_buffer_are_accepted(backend, name, views):
    from kvcomm import reference as ref

    torch.manual_seed(0)
    b = backend.to(torch.randn(2, 3, 20, 64))
    dst, base = views(b)
    expected = ref.fused_offset(base.cpu().clone(), [], torch.zeros(0, dst.shape[2]), torch.tensor(5), None)
    before = b.clone()
    backend.ops.fused_offset_into(dst, base, [], backend.to(torch.zeros(0, dst.shape[2])), 5, None)
    torch.testing.assert_close(dst.cpu(), expected)
    written = torch.zeros(b.shape, dtype=torch.bool, device=b.device)
    written.as_strided(dst.shape, dst.stride(), dst.storage_offset()).fill_(True)
    assert torch.equal(b[~written], before[~written])
