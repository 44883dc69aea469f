"""Hugging Face transformers glue: `enable(model)` and the buffer-backed cache.

    import kvcomm.hf
    spec = kvcomm.hf.enable(model)   # checks support, registers and selects "kvcomm" attention

Supported: rotate-half RoPE decoders Llama, Qwen2, Mistral, Qwen3 with full
attention and a RoPE whose key moves are exact (default, linear, llama3, yarn;
dynamic within the original context; longrope only with equal factors).
"""
from __future__ import annotations

from . import attention
from .cache import KVBufferCache
from .support import SUPPORTED_MODEL_TYPES, ModelSpec, UnsupportedModelError, inspect_model


def enable(model) -> ModelSpec:
    """Checks that KVCOMM can run `model` exactly, registers the "kvcomm" attention
    implementation (AttentionInterface + AttentionMaskInterface) and switches the
    model to it. Returns the ModelSpec (layers, heads, RoPE inv_freq, ...).
    Raises UnsupportedModelError (a ValueError) naming what is unsupported."""
    spec = inspect_model(model)
    attention.register()
    model.set_attn_implementation(attention.NAME)
    if model.config._attn_implementation != attention.NAME:
        raise UnsupportedModelError(
            f"kvcomm: {type(model).__name__} did not accept the '{attention.NAME}' attention implementation")
    model.eval()
    model._kvcomm_spec = spec
    return spec


__all__ = ["enable", "inspect_model", "ModelSpec", "UnsupportedModelError", "KVBufferCache",
           "SUPPORTED_MODEL_TYPES"]
