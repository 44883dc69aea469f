"""kvcomm.reference takes what kvcomm.ops takes: a shift given as a plain int means the
same as an int64 tensor, in the reference and in the op alike."""
from __future__ import annotations

import pytest
import torch
from rope_freqs import inv_freq
from torch.testing import assert_close

from kvcomm import ops, reference

L, H, T, D = 2, 3, 5, 64


@pytest.mark.parametrize("shift", [0, 7, -4])
def test_rope_move_takes_an_int_shift(shift):
    k = torch.randn(L, H, T, D)
    f = inv_freq(D)
    as_tensor = reference.rope_move(k, f, torch.tensor(shift))
    assert_close(reference.rope_move(k, f, shift), as_tensor, rtol=0, atol=0)
    assert_close(reference.rope_rotate(k, f, shift), as_tensor)
    assert_close(ops.rope_move(k, f, shift), as_tensor, rtol=1e-5, atol=1e-5)


def test_fused_offset_takes_an_int_shift_and_defaults_to_values():
    base = torch.randn(L, H, T, D)
    deltas = [torch.randn(L, H, T + 2, D) for _ in range(3)]
    weights = torch.softmax(torch.randn(3, T), dim=0)
    f = inv_freq(D)
    keys = reference.fused_offset(base, deltas, weights, 9, f)
    assert_close(keys, reference.fused_offset(base, deltas, weights, torch.tensor(9), f), rtol=0, atol=0)
    assert_close(ops.fused_offset(base, deltas, weights, 9, f), keys, rtol=1e-5, atol=1e-5)
    # inv_freq defaults to None (values: no rotation), as in kvcomm.ops
    values = reference.fused_offset(base, deltas, weights, 9)
    assert_close(ops.fused_offset(base, deltas, weights, 9), values, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(values, keys)


def test_a_per_token_shift_still_needs_one_entry_per_token():
    k = torch.randn(L, H, T, D)
    per_token = torch.arange(T)
    moved = reference.rope_move(k, inv_freq(D), per_token)
    assert_close(ops.rope_move(k, inv_freq(D), per_token), moved, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        reference.rope_move(k, inv_freq(D), torch.arange(T + 1))
