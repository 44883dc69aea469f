"""Loads a script from benchmarks/ as a module, for the tests of its pieces
(benchmarks/ is not a package)."""
from __future__ import annotations

import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def load_benchmark(name: str):
    """benchmarks/<name>.py as module kvcomm_bench_<name>."""
    spec = importlib.util.spec_from_file_location(f"kvcomm_bench_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
