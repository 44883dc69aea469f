"""kvcomm: KVCOMM cross-context KV-cache reuse for multi-agent LLM pipelines.

Not to be confused with "KVComm: Selective KV Sharing" (arXiv 2510.03346):
this package implements KVCOMM (Ye et al., NeurIPS 2025, arXiv 2510.12872).
"""
import torch  # noqa: F401  loads libc10/libtorch before the extension needs them

from . import _C  # noqa: F401  registers torch.ops.kvcomm
from . import ops
from ._C import AnchorPool, PoolConfig, Decision, EstimateResult  # noqa: F401

__version__ = "0.1.0"

__all__ = ["ops", "AnchorPool", "PoolConfig", "Decision", "EstimateResult", "__version__"]
