"""RoPE moves are exact against keys a real transformers model computes.

Layer-0 keys of a tiny Llama at positions 0..n-1, moved by s with the model's
own inv_freq, must equal the keys the same model computes at s..s+n-1, for
every rope type whose frequencies do not depend on the sequence length."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvcomm import ops

ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # Dynamic NTK is static while the sequence stays within max_position_embeddings.
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 64},
}


def tiny_llama(rope: dict, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=512, rope_parameters=dict(rope))
    return LlamaForCausalLM(cfg).to(dtype).eval()


def layer0_keys(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
    return cache.layers[0].keys[0].unsqueeze(0)  # [1 layer, H, T, D]


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [5, 200])
def test_layer0_keys_move_exactly(rope, dtype, shift):
    model = tiny_llama(ROPE_TYPES[rope], dtype)
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(1))
    at_zero = layer0_keys(model, ids, 0)
    at_shift = layer0_keys(model, ids, shift)
    inv_freq = model.model.rotary_emb.inv_freq.float()
    moved = ops.rope_move(at_zero, inv_freq, shift)
    # bf16: both sides carry one bf16 rounding of the key (HF rounds cos/sin
    # to bf16 too), so allow a few bf16 ulps.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=3e-2)
    assert_close(moved, at_shift, **tol)
    # A wrong move (off by one position) must not pass the same check.
    if dtype == torch.float32:
        with pytest.raises(AssertionError):
            assert_close(ops.rope_move(at_zero, inv_freq, shift + 1), at_shift, **tol)


@pytest.mark.parametrize("rope", ["yarn", "llama3"])
def test_attention_scaling_is_not_applied_twice(rope):
    """yarn scales cos/sin by attention_factor; the cached key carries it, so
    the move must be a pure rotation (checked in float32 above); here make
    sure the model really has a non-trivial scaling for yarn."""
    model = tiny_llama(ROPE_TYPES[rope], torch.float32)
    scaling = model.model.rotary_emb.attention_scaling
    assert (scaling != 1.0) == (rope == "yarn")
