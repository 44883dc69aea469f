"""The CUDA registration, checked from the sources (runs everywhere): every op
schema in cpp/schemas.cpp has an m.impl in cuda/cuda_register.cu that points
at a function defined in cuda/, and only that file pays for ATen's headers."""
from __future__ import annotations

import re

from backends import ROOT, schemas


def _cuda_impls() -> dict[str, str]:
    """name -> C++ function of every m.impl in the CUDA registration."""
    text = (ROOT / "cuda" / "cuda_register.cu").read_text()
    assert "TORCH_LIBRARY_IMPL(kvcomm, CUDA, m)" in text
    return dict(re.findall(r'm\.impl\(\s*"(\w+)"\s*,\s*&([\w:]+)\s*\)', text))


def test_schemas_parse():
    names = set(schemas())
    assert {"rope_move", "fused_offset_into", "match_decide"} <= names and len(names) >= 8


def test_every_schema_has_a_cuda_kernel():
    declared, impls = set(schemas()), _cuda_impls()
    assert declared - set(impls) == set(), "schemas without a CUDA implementation"
    assert set(impls) - declared == set(), "CUDA implementations of unknown schemas"


def test_cuda_impls_are_defined():
    sources = "\n".join(p.read_text() for p in sorted((ROOT / "cuda").glob("*.cu")))
    for name, fn in _cuda_impls().items():
        short = fn.rsplit("::", 1)[-1]
        assert re.search(rf"\b{re.escape(short)}\s*\([^;]*\)\s*\{{", sources), (
            f"{name}: {fn} is registered but no definition was found in cuda/*.cu")


def test_only_the_register_file_includes_aten():
    # Compile-time budget: ATen.h costs ~25 s per nvcc translation unit.
    for path in (ROOT / "cuda").glob("*.cu"):
        text = path.read_text()
        if path.name != "cuda_register.cu":
            assert "ATen" not in text and "torch/" not in text, path.name
