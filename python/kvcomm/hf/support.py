"""Which transformers models KVCOMM can run on, and their RoPE as the core needs it.

The method moves cached keys between positions by rotating them (docs/method.md, "Keys move exactly").
That is exact only for rotate-half RoPE over the whole head dimension with
frequencies that do not depend on the sequence length, in a decoder whose every
layer attends to the full prefix. `inspect_model` checks all of that and returns
the numbers the engine needs; anything else is refused with an error that names
what is unsupported, never run approximately.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
# RoPE types whose inv_freq is fixed once the model is built. "dynamic" is fixed
# only while sequences stay within the original context (then it recomputes).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The model cannot run KVCOMM exactly; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a supported model."""
    model_type: str
    num_layers: int
    kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor        # float32 [head_dim/2], on the model's device
    attention_scaling: float      # already inside every cached key; never re-applied
    rope_type: str
    max_positions: int            # config.max_position_embeddings
    exact_positions: int | None   # positions up to which key moves stay exact (None: all)
    dtype: torch.dtype
    device: torch.device

    def describe(self) -> str:
        return (f"{self.model_type}: {self.num_layers} layers, {self.kv_heads} KV heads, head_dim "
                f"{self.head_dim}, rope {self.rope_type}, {self.dtype}, {self.device}")


def _rope_parameters(config) -> dict:
    rp = getattr(config, "rope_parameters", None)
    if rp is None:
        rp = getattr(config, "rope_scaling", None) or {}
    if not isinstance(rp, dict):
        rp = dict(rp)
    if any(isinstance(v, dict) for v in rp.values()):
        raise UnsupportedModelError(
            "kvcomm: per-layer-type RoPE parameters (different RoPE for different layers) are not "
            f"supported; got rope_parameters with keys {sorted(rp)}")
    return rp


def _check_attention_pattern(config, model_type: str) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise UnsupportedModelError(
                f"kvcomm: {model_type} has layers of type {other}; only full attention is supported "
                "(a sliding-window or chunked layer does not see the whole prefix, so cached KV of "
                "shared text cannot be reused)")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", None)
    if window is not None and uses_window is not False:
        raise UnsupportedModelError(
            f"kvcomm: sliding-window attention is not supported ({model_type} has sliding_window="
            f"{window}). If every prompt and reply stays shorter than the window, attention is "
            "full anyway: set config.sliding_window = None before loading to run it.")
    if getattr(config, "attention_chunk_size", None) is not None:
        raise UnsupportedModelError("kvcomm: chunked attention is not supported")


def _check_rope(config, rotary, head_dim: int, model_type: str) -> tuple[str, int | None]:
    rp = _rope_parameters(config)
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    if "mrope_section" in rp or "mrope" in str(rope_type):
        raise UnsupportedModelError(
            f"kvcomm: multimodal RoPE (mrope_section={rp.get('mrope_section')}) is not supported: keys "
            "rotate by several position streams, so a single position shift cannot move them")
    partial = rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(
            f"kvcomm: partial rotary embeddings (partial_rotary_factor={partial}) are not supported; "
            "the core rotates the whole head dimension")
    exact_positions = None
    if rope_type == "longrope":
        short, long = rp.get("short_factor"), rp.get("long_factor")
        if short is None or long is None or list(short) != list(long):
            raise UnsupportedModelError(
                "kvcomm: longrope with distinct short_factor and long_factor is not supported: the "
                "frequencies switch with the sequence length, so keys cached at one length cannot be "
                "moved exactly in a longer sequence")
    elif rope_type == "dynamic":
        exact_positions = int(getattr(rotary, "original_max_seq_len", config.max_position_embeddings))
    elif rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"kvcomm: RoPE type {rope_type!r} is not supported (supported: "
            f"{', '.join(STATIC_ROPE_TYPES + ('dynamic', 'longrope with equal factors'))})")
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None or inv_freq.dim() != 1:
        raise UnsupportedModelError(f"kvcomm: {model_type}'s rotary embedding has no 1-D inv_freq buffer")
    if inv_freq.numel() * 2 != head_dim:
        raise UnsupportedModelError(
            f"kvcomm: RoPE covers {inv_freq.numel() * 2} of {head_dim} head dimensions (partial rotary); "
            "only full rotate-half RoPE is supported")
    return rope_type, exact_positions


def _check_device(device: torch.device) -> None:
    """The model's device must be one the ops have kernels for in this build; otherwise the
    first offset would fail deep inside a call with the dispatcher's backend error."""
    from ..ops import kernel_device_types

    kinds = kernel_device_types()
    if device.type in kinds:
        return
    hint = (" (this build has no CUDA kernels: rebuild with nvcc on the PATH and a CUDA torch, or "
            "KVCOMM_CUDA=1)" if device.type == "cuda" else "")
    raise UnsupportedModelError(f"kvcomm: the model is on {device}, but this kvcomm build has kernels for "
                                f"{', '.join(sorted(kinds))} only{hint}")


def inspect_model(model) -> ModelSpec:
    """Checks `model` and returns its ModelSpec, or raises UnsupportedModelError."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"kvcomm: {type(model).__name__} is not a transformers model")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"kvcomm: architecture {model_type!r} ({type(model).__name__}) is not supported; supported "
            f"are rotate-half RoPE decoders {', '.join(SUPPORTED_MODEL_TYPES)}")
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if inner is None or rotary is None or not hasattr(inner, "layers"):
        raise UnsupportedModelError(
            f"kvcomm: {type(model).__name__} has no model.rotary_emb / model.layers; pass the causal-LM "
            "model (e.g. LlamaForCausalLM)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    _check_attention_pattern(config, model_type)
    rope_type, exact_positions = _check_rope(config, rotary, head_dim, model_type)
    # For dynamic RoPE the live inv_freq may have been rescaled by a long sequence;
    # the original one is what every sequence within the original context uses.
    inv = getattr(rotary, "original_inv_freq", None) if rope_type == "dynamic" else None
    inv = rotary.inv_freq if inv is None else inv
    param = next(model.parameters())
    _check_device(param.device)
    return ModelSpec(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        inv_freq=inv.detach().to(device=param.device, dtype=torch.float32).contiguous(),
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        rope_type=rope_type,
        max_positions=int(config.max_position_embeddings),
        exact_positions=exact_positions,
        dtype=param.dtype,
        device=param.device,
    )
