"""One agent as the engine keeps it: template, chat frame, exact S0 and template KV.

When an agent is added, its template is rendered once with the placeholder
markers in place and run through the model (docs/method.md section 2, "template KV"):
- S0, everything before the first placeholder, is the agent's true prefix; its KV
  is kept and reused exactly by both paths of every later call (docs/method.md section 4);
- the KV of each segment after a placeholder is kept in the neutral frame; it is
  what the segment offsets are added to on the reuse path.
A call can use these only if its own prompt has the same S0 and segment tokens
(`alignment_problem`); otherwise it runs dense and says why.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from ..hf.cache import KVBufferCache
from .kv import forward, neutral_pair
from .template import ChatFrame, PromptLayout, Template, chat_frame, fill, markers, parse_template, render_layout


@dataclass
class AgentState:
    name: str
    key: str                      # the agent's name in the pool: name@hash(system, template)
    system_prompt: str
    template: Template
    frame: ChatFrame
    layout: PromptLayout          # of the marker render
    problem: str | None = None    # why no call of this agent can reuse (template edges merge)
    s0_k: torch.Tensor | None = None
    s0_v: torch.Tensor | None = None
    seg_k: list = field(default_factory=list)   # neutral [L,H,S,D] per placeholder, None if S == 0
    seg_v: list = field(default_factory=list)
    setup_ms: float = 0.0

    @property
    def s0(self) -> int:
        return 0 if self.s0_k is None else self.s0_k.shape[2]

    def alignment_problem(self, real: PromptLayout) -> str | None:
        """Why `real` cannot use this agent's S0/segment KV, or None."""
        if self.problem:
            return self.problem
        t = self.layout
        if real.s0 != t.s0 or real.ids[:real.s0] != t.ids[:t.s0]:
            return "prefix S0 tokens differ from the template's"
        for i, (name, _, _) in enumerate(real.spans):
            if real.segment_ids(i) != t.segment_ids(i):
                return f"segment after slot {name}: tokens differ from the template's"
        if real.ids[-1] != t.ids[-1]:
            return "last prompt token differs from the template's"
        return None


def agent_key(name: str, system_prompt: str, template: str) -> str:
    # Deltas depend on the agent's prefix and segments: a changed definition gets a
    # new pool identity, so a saved pool never feeds stale deltas to it.
    digest = hashlib.sha1(f"{system_prompt}\0{template}".encode()).hexdigest()[:8]
    return f"{name}@{digest}"


@torch.inference_mode()
def build_agent(model, tokenizer, spec, name: str, system_prompt: str, template_text: str) -> AgentState:
    t0 = time.perf_counter()
    template = parse_template(template_text)
    frame = chat_frame(tokenizer, system_prompt)
    user_text, spans = fill(template, markers(template), name)
    lay = render_layout(tokenizer, frame, user_text, spans)
    state = AgentState(name=name, key=agent_key(name, system_prompt, template_text),
                       system_prompt=system_prompt, template=template, frame=frame, layout=lay)
    if lay.problem:
        state.problem = f"template: {lay.problem}"
    else:
        cache = KVBufferCache.for_spec(spec, lay.length)
        forward(model, cache, lay.ids, want_logits=False)
        state.s0_k, state.s0_v = (t.clone() for t in cache.span(0, lay.s0))
        for a, b in lay.segments:
            pair = neutral_pair(cache, a, b, spec.inv_freq) if b > a else (None, None)
            state.seg_k.append(pair[0])
            state.seg_v.append(pair[1])
    state.setup_ms = (time.perf_counter() - t0) * 1000.0
    return state
