"""Agents, their roles and tools, and the placeholders they read.

An agent is what the engine knows (an id, a system prompt, a template) plus what the
runtime needs around it (a role to show, an optional tool). Templates are generated
from the slots an agent reads, so a topology change never needs hand-edited prompts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

# The engine's slot kinds: QUESTION is "user_question", the others name their suffix.
from kvcomm.plan.template import CONDITION, CURRENT, HISTORY, QUESTION

# The engine parses "{...}" in templates as placeholders, so fixed prompt text must not
# contain braces (no "\boxed{}" in instructions).
_BRACES = re.compile(r"[{}]")


@dataclass(frozen=True)
class SlotRef:
    """One placeholder an agent reads: the question, another agent's reply this round
    (current) or last round (history), or a tool result (condition) owned by an agent."""
    kind: str
    source: str | None = None  # agent id; None for the question

    def __post_init__(self):
        if self.kind == QUESTION:
            if self.source is not None:
                raise ValueError("the question slot has no source agent")
        elif self.kind in (CURRENT, HISTORY, CONDITION):
            if not self.source:
                raise ValueError(f"a {self.kind} slot needs a source agent id")
        else:
            raise ValueError(f"unknown slot kind {self.kind!r}")

    @property
    def placeholder(self) -> str:
        if self.kind == QUESTION:
            return QUESTION
        if self.kind == CONDITION:
            return f"condition_{self.source}_current"
        return f"agent_{self.source}_{self.kind}"


def slot_kind(slot: SlotRef) -> str:
    """What a slot holds, as fidelity reports group it: "question", "condition" (a tool
    result) or "reply" (another agent's reply, this round or the last)."""
    return {QUESTION: "question", CONDITION: "condition"}.get(slot.kind, "reply")


@dataclass(frozen=True)
class ToolContext:
    """What a tool sees. `reply` is the owner's reply (tools that run after the call);
    `upstream` maps agent id -> reply for the agents the owner hears this round."""
    problem: object
    agent_id: str
    reply: str | None
    upstream: dict[str, str]
    round: int


@dataclass(frozen=True)
class ToolResult:
    text: str                 # becomes {condition_<owner>_current}; never empty
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Tool:
    """A tool owned by one agent. phase 'after': runs on the owner's reply and feeds
    the agents downstream (the math programming expert's code). phase 'before': runs on
    the upstream replies and feeds the owner itself and everyone downstream (the
    HumanEval test analyst runs the writers' code against the internal tests)."""
    name: str
    phase: str
    run: Callable[[ToolContext], ToolResult]
    label: str | None = None   # how prompts introduce its result (default "Results of ... tool:")

    def __post_init__(self):
        if self.label is not None and _BRACES.search(self.label):
            raise ValueError(f"tool {self.name!r}: label must not contain braces")
        if self.phase not in ("before", "after"):
            raise ValueError(f"tool phase must be 'before' or 'after', got {self.phase!r}")


@dataclass(frozen=True)
class Role:
    """A job in a workload. `title` labels this agent's reply in other agents' prompts;
    `instruction` closes its own prompt and says what to produce."""
    name: str
    title: str
    system_prompt: str
    instruction: str
    tool: Tool | None = None

    def __post_init__(self):
        for label, text in (("system_prompt", self.system_prompt), ("instruction", self.instruction),
                            ("title", self.title)):
            if _BRACES.search(text):
                raise ValueError(f"role {self.name!r}: {label} must not contain braces "
                                 "(they mark template placeholders)")


@dataclass
class Agent:
    id: str                   # what the engine and the placeholders call it ("0", "1", ...)
    name: str                 # unique display name ("solver", "analyst", "solver2")
    role: Role
    reads: tuple[SlotRef, ...] = ()
    template: str = ""
    is_decision: bool = False

    @property
    def tool(self) -> Tool | None:
        return self.role.tool

    @property
    def placeholders(self) -> list[str]:
        return [s.placeholder for s in self.reads]
