"""A scripted stand-in for KVCommEngine: same interface, no model.

For tests of graphs, tools, metrics and the CLI plumbing, and for dry runs of a new
graph. It checks what a real engine would reject (unknown agents, templates and inputs
the engine's template grammar rejects) and records every call it gets.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

from kvcomm.engine import MODES
from kvcomm.plan.template import fill, parse_template


@dataclass
class ScriptedCall:
    """Mirrors kvcomm.engine.AgentCall."""
    agent: str
    text: str
    mode: str
    path: str
    reason: str
    ttft_ms: float
    timings: dict
    first_token_id: int | None
    first_logits: object = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    slot_decisions: dict = field(default_factory=dict)
    slot_gates: dict = field(default_factory=dict)
    token_ids: list = field(default_factory=list)
    s0_tokens: int = 0
    computed_tokens: int = 0
    encoded_tokens: int = 0
    recomputed: dict = field(default_factory=dict)
    slot_anchors: dict = field(default_factory=dict)
    reply_logits: object = None


# Vocabulary of the scripted engine's made-up reply logits.
SCRIPTED_VOCAB = 16


def scripted_logits(token_ids: list[int], rows: int, noise: float, seed: int):
    """Made-up logits [rows, SCRIPTED_VOCAB] peaked on each reply token (row j predicts
    token j), plus deterministic noise of size `noise` (what reuse perturbs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(rows, SCRIPTED_VOCAB)
    for j in range(rows):
        out[j, token_ids[j] % SCRIPTED_VOCAB] = 4.0
    return out + noise * torch.randn(rows, SCRIPTED_VOCAB, generator=g)


class ScriptedPool:
    def __init__(self):
        self.anchors = 0

    def size(self) -> int:
        return self.anchors

    def memory_bytes(self) -> int:
        return self.anchors * 1024


def default_responder(agent: str, inputs: dict[str, str], request: int, round: int) -> str:
    """A deterministic reply that depends on the inputs."""
    h = zlib.crc32(repr(sorted(inputs.items())).encode()) % 97
    return f"Agent {agent} (request {request}, round {round}) thinks. The answer is {h}."


class ScriptedEngine:
    """Replies come from `responder(agent, inputs, request, round)`. KVCOMM calls take
    the reuse path from the `warm_after`-th request on (the method's cold start), dense
    before; TTFT is a made-up cost proportional to the prompt length (dense) or a
    constant (reuse), so speedups are visible in tests."""

    def __init__(self, responder: Callable | None = None, warm_after: int = 2,
                 dense_ms_per_char: float = 0.05, reuse_ms: float = 2.0, prefix_only: bool = False):
        self.responder = responder or default_responder
        # estimator 'none' (prefix caching): KVCOMM calls never reuse, S0's characters are free
        self.prefix_only = prefix_only
        self.warm_after = warm_after
        self.dense_ms_per_char = dense_ms_per_char
        self.reuse_ms = reuse_ms
        self.agents: dict = {}   # name -> (system prompt, parsed Template)
        self.pool = ScriptedPool()
        self.requests = 0
        self.round = 0
        self.log: list[dict] = []

    def add_agent(self, name: str, system_prompt: str, template: str) -> None:
        if name in self.agents:
            raise ValueError(f"agent {name!r} already added")
        self.agents[name] = (system_prompt, parse_template(template))

    def new_request(self) -> None:
        self.requests += 1
        self.round = 0

    def next_round(self) -> None:
        self.round += 1

    def sibling(self, pool=None, *, recompute=None, partial=None, estimator=None) -> "ScriptedEngine":
        """A new scripted engine with the same settings and its own pool (as KVCommEngine.sibling;
        a scripted engine has no pool settings, recompute or partial calls to change; estimator
        'none' makes the prefix-caching stand-in)."""
        return ScriptedEngine(self.responder, self.warm_after, self.dense_ms_per_char, self.reuse_ms,
                              prefix_only=(estimator == "none") if estimator is not None else self.prefix_only)

    def call(self, agent: str, inputs: dict[str, str], *, mode: str = "kvcomm",
             max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
             return_first_logits: bool = False, reply_ids: list[int] | None = None,
             reply_logits: int = 0, capture: bool = True, keep_cache: bool = False) -> ScriptedCall:
        if agent not in self.agents:
            raise KeyError(f"unknown agent {agent!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        system, template = self.agents[agent]
        names = template.names
        prompt = system + fill(template, inputs, agent)[0]
        reuse = mode == "kvcomm" and self.requests > self.warm_after and not self.prefix_only
        if mode == "kvcomm" and not reuse and not self.prefix_only:
            self.pool.anchors += len(names)
        text = self.responder(agent, inputs, self.requests, self.round)
        tokens = list(reply_ids) if reply_ids is not None else [
            zlib.crc32(w.encode()) % 1000 for w in text.split()][:max_new_tokens] or [0]
        dense_ms = self.dense_ms_per_char * len(prompt)
        if mode == "kvcomm" and self.prefix_only:
            dense_ms = self.dense_ms_per_char * (len(prompt) - len(system))
        ttft = self.reuse_ms if reuse else dense_ms
        prompt_tokens = len(prompt) // 4
        s0 = len(system) // 4 if mode == "kvcomm" else 0
        logits = None
        if reply_logits:
            seed = zlib.crc32(prompt.encode())
            logits = scripted_logits(tokens, min(reply_logits, len(tokens)), 0.3 if reuse else 0.0, seed)
        self.log.append({"agent": agent, "inputs": dict(inputs), "mode": mode, "round": self.round,
                         "request": self.requests, "max_new_tokens": max_new_tokens})
        return ScriptedCall(
            agent=agent, text=text, mode=mode, path="reuse" if reuse else "dense",
            reason="all slots shared" if reuse else ("dense mode" if mode == "dense" else "cold start"),
            ttft_ms=ttft, timings={"total": ttft, "first_token": ttft},
            first_token_id=tokens[0], prompt_tokens=prompt_tokens,
            new_tokens=len(tokens), token_ids=tokens, reply_logits=logits,
            s0_tokens=s0, computed_tokens=1 if reuse else prompt_tokens - s0,
            slot_anchors={n: [0, 1] for n in names} if reuse else {},
            slot_decisions={n: {"share": reuse, "reason": "scripted"} for n in names},
            slot_gates={n: {"candidates": 2 if reuse else 0} for n in names} if mode == "kvcomm" else {})

    def stats(self) -> dict:
        return {"requests": self.requests, "calls": len(self.log), "anchors": self.pool.size()}
