"""RoPE frequencies for tests that call the core directly (the engine reads a model's own)."""
from __future__ import annotations

import torch


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
