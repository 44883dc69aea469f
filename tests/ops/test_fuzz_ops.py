"""Hypothesis fuzzing of the ops: random shapes, dtypes, strides (transposed,
sliced, expanded), zero-length and mismatched inputs, NaN/Inf values. Every
call either matches the reference or raises a RuntimeError that names the op
-- never a crash, a hang or a silently wrong answer.

KVCOMM_FUZZ_EXAMPLES sets the examples per test (CI default 60)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from kvcomm import ops
from kvcomm import reference as ref
from op_cases import tol

EXAMPLES = int(os.environ.get("KVCOMM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def layouts(draw):
    return dict(
        L=draw(st.integers(0, 3)), H=draw(st.integers(0, 3)), T=draw(st.integers(0, 9)),
        D=draw(st.sampled_from([0, 2, 6, 8, 64])), dtype=draw(st.sampled_from(DTYPES)),
        stride=draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])),
        special=draw(st.sampled_from(["none", "none", "nan", "inf"])),
        seed=draw(st.integers(0, 2**16)),
    )


def make(shape, dtype, stride, special, gen):
    L, H, T, D = shape
    if stride == "expanded" and H > 0:
        t = torch.randn(L, 1, T, D, generator=gen).to(dtype).expand(L, H, T, D)
    elif stride == "transposed":
        t = torch.randn(L, H, D, T, generator=gen).to(dtype).transpose(2, 3)
    elif stride == "sliced":
        t = torch.randn(L, H, T, D * 2, generator=gen).to(dtype)[..., ::2]
    else:
        t = torch.randn(L, H, T, D, generator=gen).to(dtype)
    if special != "none" and t.numel() > 0:
        t = t.clone()
        t[0, 0, 0, 0] = float("nan") if special == "nan" else float("inf")
    return t


def check(call, expected_call, dtype, *, exact_bool=False):
    """Run the op; if it raises, the message must name the op, and the
    reference must not have produced a valid answer for a valid input."""
    try:
        got = call()
    except RuntimeError as e:
        assert "kvcomm." in str(e), f"error does not name the op: {e}"
        return None
    exp = expected_call()
    for g, e in zip(got if isinstance(got, tuple) else (got,), exp if isinstance(exp, tuple) else (exp,)):
        if g.dtype == torch.bool:
            assert torch.equal(g, e)
        else:
            assert_close(g, e.to(g.dtype), equal_nan=True, **tol(dtype if g.dtype == dtype else torch.float32))
    return got


def inv_freq(D):
    return 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / max(D, 1)))


@FUZZ
@given(layouts(), st.integers(-300, 300), st.booleans())
def test_fuzz_rope_move(lay, shift, per_token):
    g = torch.Generator().manual_seed(lay["seed"])
    shape = (lay["L"], lay["H"], lay["T"], lay["D"])
    keys = make(shape, lay["dtype"], lay["stride"], lay["special"], g)
    s = torch.full((lay["T"],), shift) if per_token else torch.tensor(shift)
    check(lambda: ops.rope_move(keys, inv_freq(lay["D"]), s), lambda: ref.rope_move(keys, inv_freq(lay["D"]), s),
          lay["dtype"])


@FUZZ
@given(layouts(), st.integers(0, 5), st.integers(0, 3), st.booleans())
def test_fuzz_distances_and_weights(lay, n, extra, rms):
    g = torch.Generator().manual_seed(lay["seed"])
    shape = (lay["L"], lay["H"], lay["T"], lay["D"])
    content = make(shape, lay["dtype"], lay["stride"], lay["special"], g)
    anchors = [make((lay["L"], lay["H"], lay["T"] + extra, lay["D"]), lay["dtype"], "contiguous", "none", g)
               for _ in range(n)]
    check(lambda: ops.value_distances(content, anchors, rms), lambda: ref.value_distances(content, anchors, rms),
          torch.float32)
    check(lambda: ops.token_weights(content, anchors, 0.5), lambda: ref.token_weights(content, anchors, 0.5),
          torch.float32)
    check(lambda: ops.segment_weights(content, anchors, 0.5), lambda: ref.segment_weights(content, anchors, 0.5),
          torch.float32)


@FUZZ
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=24),
       st.floats(0.05, 10), st.floats(0, 1), st.floats(0.05, 1))
def test_fuzz_match_decide(dist, tau, gamma, top_p):
    d = torch.tensor(dist, dtype=torch.float32)
    probs, entropy, share, credit = ops.match_decide(d, tau, gamma, top_p)  # valid parameters never raise
    rprobs, rentropy, rshare, _ = ref.match_decide(d, tau, gamma, top_p)
    assert_close(probs, rprobs, equal_nan=True, atol=1e-6, rtol=1e-5)
    assert_close(entropy, rentropy, equal_nan=True, atol=1e-5, rtol=1e-5)
    if not torch.isfinite(d).all():
        assert not bool(share) and not credit.any(), "non-finite distances must never share"
        return
    gate = gamma * torch.log2(torch.tensor(float(max(len(dist), 1)))).item()
    if abs(float(entropy) - gate) > 1e-5:  # away from the gate's rounding boundary
        assert bool(share) == bool(rshare)
    if not bool(share):
        assert not credit.any()
        return
    # Credit: the most probable anchors, as few as reach top_p (float32
    # rounding decides exact ties with top_p, so allow 1e-5 there).
    chosen = probs[credit]
    assert chosen.min() >= probs[~credit].max() if (~credit).any() else True
    mass = chosen.sum().item()
    assert mass >= top_p - 1e-5 or credit.all()
    assert mass - chosen.min().item() < top_p + 1e-5


@FUZZ
@given(layouts(), st.integers(0, 4), st.sampled_from(["token", "channel", "bad"]), st.booleans(),
       st.integers(-100, 100))
def test_fuzz_fused_offset(lay, n, wkind, keys, shift):
    g = torch.Generator().manual_seed(lay["seed"])
    L, H, T, D = lay["L"], lay["H"], lay["T"], lay["D"]
    base = make((L, H, T, D), lay["dtype"], lay["stride"], lay["special"], g)
    deltas = [make((L, H, T + 1, D), lay["dtype"], "contiguous", "none", g) for _ in range(n)]
    if wkind == "token":
        w = torch.rand(n, T, generator=g)
    elif wkind == "channel":
        w = torch.rand(n, L, H, D, generator=g)
    else:
        w = torch.rand(n + 1, T + 1, generator=g)
    f = inv_freq(D) if keys else None
    got = check(lambda: ops.fused_offset(base, deltas, w, shift, f),
                lambda: ref.fused_offset(base, deltas, w, torch.tensor(shift), f), lay["dtype"])
    if wkind == "bad":
        assert got is None, "mismatched weights must be rejected"
    # Writing into an expanded (overlapping) destination is rejected.
    if L > 0 and H > 1 and T > 0 and D > 0 and wkind != "bad":
        dst = torch.zeros(L, 1, T, D, dtype=lay["dtype"]).expand(L, H, T, D)
        with pytest.raises(RuntimeError, match="overlapping memory"):
            ops.fused_offset_into(dst, base, deltas, w, shift, f)
