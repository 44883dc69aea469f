"""Per-request state: content seen so far (base KV + decision), captured replies."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def decision_numbers(decision, tokens: int) -> dict:
    """What the pool's share-or-anchor decision (docs/method.md section 4) saw, small enough for a
    call record: with it a run's records say why the gate fired (how many candidates,
    how close the nearest two were, the entropy against its threshold), not only that it did."""
    dist = sorted(float(x) for x in decision.distances)
    return {"tokens": int(tokens), "candidates": len(decision.candidates),
            "entropy": float(decision.entropy), "threshold": float(decision.threshold),
            "nearest": dist[:2], "top_prob": max((float(p) for p in decision.probs), default=None)}


@dataclass
class Content:
    """One content in one slot of this request: its base and the docs/method.md section 4 decision.

    Decided once, by its first consumer (or at capture for a reply), and shared by
    every agent that consumes the same tokens in the same slot this request."""
    slot: str
    ids: tuple[int, ...]
    base_k: torch.Tensor          # neutral [L,H,n,D]
    base_v: torch.Tensor
    source: str                   # "reply" (cut from the sender's cache) or "header"
    share: bool
    reason: str                   # the pool's decision reason
    anchor_id: int | None = None  # set when this content is an anchor of its slot
    gate: dict = field(default_factory=dict)   # the decision's numbers (decision_numbers)

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class Reply:
    """An agent's reply: generated tokens that carry KV, and that KV (neutral)."""
    agent: str
    text: str
    ids: tuple[int, ...]
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class RequestState:
    index: int
    round: int = 0
    contents: dict = field(default_factory=dict)   # (slot, ids) -> Content
    encoded: dict = field(default_factory=dict)    # (kind, ids) -> (k, v) header encodings
    current: dict = field(default_factory=dict)    # agent -> Reply, this round
    history: dict = field(default_factory=dict)    # agent -> Reply, previous round

    def next_round(self) -> None:
        self.round += 1
        self.history = self.current
        self.current = {}
