"""kvcomm.hf.enable / inspect_model: the supported decoders give the right ModelSpec,
and everything the core cannot run exactly is refused with an error naming it."""
from __future__ import annotations

import pytest
import torch

import kvcomm.hf as khf
from kvcomm.hf import attention as kattn
from kvcomm.hf import UnsupportedModelError
from kvcomm.models import random_model

from conftest import ARCHS

ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _expected_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


@pytest.mark.parametrize("arch", ARCHS)
def test_enable_supported_arch_gives_spec(arch):
    model, tok = random_model(arch)  # fresh: enable() switches the attention implementation
    ids = torch.tensor([tok("Some words to run through the model.")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    spec = khf.enable(model)
    assert model.config._attn_implementation == kattn.NAME
    assert spec.model_type == arch
    assert (spec.num_layers, spec.kv_heads, spec.head_dim) == (2, 2, 16)
    assert spec.rope_type == "default" and spec.attention_scaling == 1.0
    assert spec.exact_positions is None and spec.max_positions == 4096
    assert spec.dtype == torch.float32 and spec.device.type == "cpu"
    assert spec.inv_freq.dtype == torch.float32 and spec.inv_freq.shape == (8,)
    torch.testing.assert_close(spec.inv_freq, _expected_inv_freq(10000.0, 16))
    torch.testing.assert_close(spec.inv_freq, model.model.rotary_emb.inv_freq.float())
    assert arch in spec.describe()
    # The kvcomm attention is plain SDPA attention: outputs must not change.
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_spec_follows_model_dtype_and_rope_theta():
    model, _ = random_model("qwen3", dtype=torch.bfloat16, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 500.0})
    spec = khf.inspect_model(model)
    assert spec.dtype == torch.bfloat16
    assert spec.inv_freq.dtype == torch.float32  # the core always takes float32 frequencies
    # Casting the model casts its inv_freq buffer too, and the model rotates keys with
    # that rounded copy: the spec must carry exactly what the model uses ...
    live = model.model.rotary_emb.inv_freq
    assert torch.equal(spec.inv_freq, live.float())
    # ... which is theta's frequencies to bf16 precision.
    torch.testing.assert_close(spec.inv_freq, _expected_inv_freq(500.0, 16), rtol=8e-3, atol=0)


@pytest.mark.parametrize("params,rope_type,scaled", [
    ({"rope_type": "linear", "factor": 2.0}, "linear", False),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 1024}, "llama3", False),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, "yarn", True),
    ({"rope_type": "longrope", "short_factor": [1.5] * 8, "long_factor": [1.5] * 8,
      "original_max_position_embeddings": 1024}, "longrope", True),
])
def test_static_rope_types_are_accepted(params, rope_type, scaled):
    model, _ = random_model("llama", rope_parameters={"rope_theta": 10000.0, **params})
    spec = khf.inspect_model(model)
    assert spec.rope_type == rope_type and spec.exact_positions is None
    torch.testing.assert_close(spec.inv_freq, model.model.rotary_emb.inv_freq.float())
    # yarn / longrope scale attention; the factor is reported, never re-applied by the core.
    assert (spec.attention_scaling != 1.0) == scaled
    assert spec.attention_scaling == pytest.approx(model.model.rotary_emb.attention_scaling)


def test_dynamic_rope_is_exact_only_within_original_context():
    model, _ = random_model("llama", max_position_embeddings=512,
                            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    spec = khf.inspect_model(model)
    assert spec.rope_type == "dynamic" and spec.exact_positions == 512
    torch.testing.assert_close(spec.inv_freq, _expected_inv_freq(10000.0, 16))


# ------------------------------------------------------------------ refusals


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _phi():
    from transformers import PhiConfig, PhiForCausalLM
    return PhiForCausalLM(PhiConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                    num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("build,needles", [
    (_gpt2, ["architecture 'gpt2'", "GPT2LMHeadModel", "llama"]),
    (_phi, ["architecture 'phi'", "PhiForCausalLM"]),
])
def test_unsupported_architecture_is_named(build, needles):
    model = build()
    impl = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError) as e:
        khf.enable(model)
    for needle in needles:
        assert needle in str(e.value)
    assert model.config._attn_implementation == impl  # refused before anything was switched


def test_not_a_model_and_bare_backbone_are_refused():
    with pytest.raises(UnsupportedModelError, match="not a transformers model"):
        khf.inspect_model(object())
    model, _ = random_model("llama")
    with pytest.raises(UnsupportedModelError, match="causal-LM"):
        khf.inspect_model(model.model)  # LlamaModel: no .model.rotary_emb


def _mutated(arch: str, **config_attrs):
    """A fresh tiny model whose config is edited after building (for settings the
    architecture would not build with, e.g. an unknown rope type)."""
    model, _ = random_model(arch)
    for key, value in config_attrs.items():
        setattr(model.config, key, value)
    return model


@pytest.mark.parametrize("build,needles", [
    (lambda: random_model("mistral", sliding_window=16)[0], ["sliding-window", "sliding_window=16"]),
    (lambda: random_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)[0],
     ["sliding_attention", "only full attention"]),
    (lambda: _mutated("llama", attention_chunk_size=8), ["chunked attention"]),
    (lambda: random_model("llama", rope_parameters={**ROPE, "partial_rotary_factor": 0.5})[0],
     ["partial rotary", "partial_rotary_factor=0.5"]),
    (lambda: _mutated("qwen3", rope_parameters={"full_attention": dict(ROPE),
                                                "sliding_attention": {**ROPE, "rope_theta": 1e6}}),
     ["per-layer-type RoPE", "full_attention", "sliding_attention"]),
    (lambda: _mutated("llama", rope_parameters={"full_attention": dict(ROPE), **ROPE}),
     ["per-layer-type RoPE"]),
    (lambda: random_model("qwen2", rope_parameters={**ROPE, "mrope_section": [2, 3, 3]})[0],
     ["multimodal RoPE", "mrope_section=[2, 3, 3]"]),
    (lambda: random_model("llama", rope_parameters={
        **ROPE, "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 1024})[0],
     ["longrope", "short_factor and long_factor"]),
    (lambda: _mutated("llama", rope_parameters={**ROPE, "rope_type": "made_up"}),
     ["RoPE type 'made_up' is not supported", "llama3", "yarn"]),
])
def test_unsupported_settings_are_named(build, needles):
    model = build()
    with pytest.raises(UnsupportedModelError) as e:
        khf.enable(model)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    assert model.config._attn_implementation != kattn.NAME


def test_partial_rotary_caught_by_inv_freq_size():
    # A model whose config does not say "partial" but whose rotary embedding covers
    # half the head dimension (as Phi-style models do) is refused too.
    model, _ = random_model("llama")
    rot = model.model.rotary_emb
    rot.register_buffer("inv_freq", rot.inv_freq[:4].clone(), persistent=False)
    with pytest.raises(UnsupportedModelError, match="RoPE covers 8 of 16 head dimensions"):
        khf.inspect_model(model)


def test_unsupported_error_is_a_value_error():
    assert issubclass(UnsupportedModelError, ValueError)


def test_attention_refuses_a_cache_shorter_than_the_queries():
    model, _ = random_model("llama")
    khf.enable(model)
    layer = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 5, 16)
    kv = torch.zeros(1, 4, 3, 16)
    with pytest.raises(RuntimeError, match="3 cached keys for 5 queries in layer 0"):
        kattn.kvcomm_attention(layer, q, kv, kv, None, scaling=0.25)



def test_kernel_device_types_of_this_build():
    from kvcomm import ops
    kinds = ops.kernel_device_types()
    assert "cpu" in kinds and kinds <= {"cpu", "cuda"}
    if "cuda" in kinds and torch.cuda.is_available():     # the claim holds: an op runs there
        x = torch.randn(1, 1, 2, 4, device="cuda")
        assert ops.rope_move(x, torch.ones(2, device="cuda"), 1).device.type == "cuda"


def test_model_on_a_device_without_kernels_is_refused(monkeypatch):
    model, _ = random_model("llama")
    monkeypatch.setattr("kvcomm.ops.kernel_device_types", lambda: frozenset({"cpu"}))
    khf.inspect_model(model)                                   # on the CPU: fine
    with pytest.raises(UnsupportedModelError, match=r"the model is on meta, but this kvcomm build has "
                                                    r"kernels for cpu only"):
        khf.inspect_model(model.to("meta"))
