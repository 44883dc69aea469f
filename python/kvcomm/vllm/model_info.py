"""What the connector needs to know about the model vLLM serves, from its configuration.

vLLM owns the weights; the connector never loads a second copy. It needs the same facts
KVCOMM's transformers glue checks (kvcomm.hf.support): a supported rotate-half RoPE
decoder with full attention in every layer, and the RoPE frequencies that move cached
keys exactly (docs/method.md, "Keys move exactly"). They come from the model's Hugging Face configuration,
through the transformers rotary-embedding class of that architecture (built without
weights), and go through the same checks as kvcomm.hf.inspect_model.
"""
from __future__ import annotations

import importlib

import torch

from ..hf import support
from ..hf.support import ModelSpec, UnsupportedModelError


def _rotary(config, model_type: str):
    """The architecture's transformers rotary embedding, built from the config alone."""
    try:
        mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as e:
        raise UnsupportedModelError(f"kvcomm: no transformers modeling module for {model_type!r}: {e}") from None
    classes = [getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding") and not n.startswith("_")]
    if not classes:
        raise UnsupportedModelError(f"kvcomm: {model_type} has no rotary embedding class in transformers")
    return classes[0](config=config)


def connector_spec(hf_config, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device) -> ModelSpec:
    """ModelSpec of the served model as one worker holds it (kv_heads: this rank's heads).
    UnsupportedModelError when KVCOMM cannot run on it exactly."""
    config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    model_type = getattr(config, "model_type", None)
    if model_type not in support.SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"kvcomm: architecture {model_type!r} is not supported; supported are "
                                    f"rotate-half RoPE decoders {', '.join(support.SUPPORTED_MODEL_TYPES)}")
    heads = config.num_attention_heads
    cfg_head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if cfg_head_dim != head_dim:
        raise UnsupportedModelError(f"kvcomm: the KV cache has head_dim {head_dim}, the config {cfg_head_dim}")
    if num_layers != config.num_hidden_layers:
        raise UnsupportedModelError(f"kvcomm: the worker registered {num_layers} KV caches for a model of "
                                    f"{config.num_hidden_layers} layers (pipeline parallelism is not supported)")
    support._check_attention_pattern(config, model_type)
    rotary = _rotary(config, model_type)
    rope_type, exact_positions = support._check_rope(config, rotary, head_dim, model_type)
    inv = getattr(rotary, "original_inv_freq", None) if rope_type == "dynamic" else None
    inv = rotary.inv_freq if inv is None else inv
    return ModelSpec(model_type=model_type, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim,
                     inv_freq=inv.detach().to(device=device, dtype=torch.float32).contiguous(),
                     attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)), rope_type=rope_type,
                     max_positions=int(config.max_position_embeddings), exact_positions=exact_positions,
                     dtype=dtype, device=device)
