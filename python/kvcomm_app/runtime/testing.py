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
from kvcomm.engine.template import fill, parse_template


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
                 dense_ms_per_char: float = 0.05, reuse_ms: float = 2.0):
        self.responder = responder or default_responder
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

    def call(self, agent: str, inputs: dict[str, str], *, mode: str = "kvcomm",
             max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
             return_first_logits: bool = False) -> ScriptedCall:
        if agent not in self.agents:
            raise KeyError(f"unknown agent {agent!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        system, template = self.agents[agent]
        names = template.names
        prompt = system + fill(template, inputs, agent)[0]
        reuse = mode == "kvcomm" and self.requests > self.warm_after
        if mode == "kvcomm" and not reuse:
            self.pool.anchors += len(names)
        text = self.responder(agent, inputs, self.requests, self.round)
        dense_ms = self.dense_ms_per_char * len(prompt)
        ttft = self.reuse_ms if reuse else dense_ms
        self.log.append({"agent": agent, "inputs": dict(inputs), "mode": mode, "round": self.round,
                         "request": self.requests, "max_new_tokens": max_new_tokens})
        return ScriptedCall(
            agent=agent, text=text, mode=mode, path="reuse" if reuse else "dense",
            reason="all slots shared" if reuse else ("dense mode" if mode == "dense" else "cold start"),
            ttft_ms=ttft, timings={"total": ttft, "first_token": ttft},
            first_token_id=zlib.crc32(text.encode()) % 1000, prompt_tokens=len(prompt) // 4,
            new_tokens=len(text) // 4,
            slot_decisions={n: {"share": reuse, "reason": "scripted"} for n in names},
            slot_gates={n: {"candidates": 2 if reuse else 0} for n in names} if mode == "kvcomm" else {})

    def stats(self) -> dict:
        return {"requests": self.requests, "calls": len(self.log), "anchors": self.pool.size()}
