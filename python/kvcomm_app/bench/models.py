"""The model a benchmark runs on.

    smollm2               the embedded SmolLM2-135M-Instruct (CPU default; 8192 positions)
    llama-3.1-8b-random   Llama-3.1-8B shapes with random weights (GPU default): 32 layers,
                          hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256,
                          llama3 RoPE. Time to first token does not depend on weight values.
                          Its tokenizer is the offline byte-level test tokenizer (the filler
                          text is then single letters): token counts, not words, set the cost.
    tiny-random           a 2-layer random Llama (tests)
    PATH                  a local transformers model folder
"""
from __future__ import annotations

import os

import torch

SMOLLM2 = "smollm2"
LLAMA_8B_RANDOM = "llama-3.1-8b-random"
TINY_RANDOM = "tiny-random"
NAMED = (SMOLLM2, LLAMA_8B_RANDOM, TINY_RANDOM)

LLAMA_31_8B_SHAPES = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def default_model(device: str) -> str:
    return LLAMA_8B_RANDOM if torch.device(device).type == "cuda" else SMOLLM2


def llama_8b_random(device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides):
    """(model, tokenizer): a Llama-3.1-8B-shaped decoder with random weights, built
    directly on `device` (no 8B initialisation on the host). `overrides` change config
    fields (the tests build a 2-layer, narrow one with the same code)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvcomm.models import _quiet_transformers, tiny_tokenizer

    tok = tiny_tokenizer()
    kw = dict(LLAMA_31_8B_SHAPES, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    config = LlamaConfig(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet_transformers(), torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), tok


def load_bench_model(name: str | None, device: str, dtype: torch.dtype):
    """(model, tokenizer, display name)."""
    from kvcomm.models import EMBEDDED_NAME, load_model, random_model

    name = name or default_model(device)
    if name == SMOLLM2:
        model, tok = load_model(None, dtype=dtype, device=device)
        return model, tok, EMBEDDED_NAME
    if name == LLAMA_8B_RANDOM:
        model, tok = llama_8b_random(device, dtype)
        return model, tok, "Llama-3.1-8B-shaped, random weights"
    if name == TINY_RANDOM:
        model, tok = random_model("llama", dtype=dtype, device=device, max_position_embeddings=8192)
        return model, tok, "tiny random Llama (2 layers)"
    if not os.path.isdir(name):
        raise FileNotFoundError(f"--model {name!r}: not one of {', '.join(NAMED)} and not a model folder")
    model, tok = load_model(name, dtype=dtype, device=device)
    return model, tok, os.path.basename(os.path.normpath(name))
