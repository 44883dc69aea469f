"""Adding an agent to KVCommEngine: its template rendered once with the placeholder markers
in place and run through the model (docs/method.md, "Terms": template KV). The planner keeps
what that forward gives (kvcomm.plan.state.agent_from_template_kv): the exact S0, reused by
both paths of every later call, and the neutral-frame KV of each segment after a placeholder,
what the segment offsets are added to on the reuse path."""
from __future__ import annotations

import time

import torch

from ..hf.cache import KVBufferCache
from ..plan.state import AgentState, agent_from_template_kv, agent_key
from ..plan.template import ChatFrame, chat_frame, fill, markers, parse_template, render_layout
from .kv import forward


@torch.inference_mode()
def build_agent(model, tokenizer, spec, name: str, system_prompt: str, template_text: str, *,
                frame: ChatFrame | None = None, key: str | None = None, template_key: str = "") -> AgentState:
    """frame: the chat text around the template (default: the chat template's user turn after
    `system_prompt`; RAW_FRAME for a template that is a whole rendered prompt). key: the pool
    identity (default agent_key(name, system prompt, template))."""
    t0 = time.perf_counter()
    template = parse_template(template_text)
    frame = frame or chat_frame(tokenizer, system_prompt)
    user_text, spans = fill(template, markers(template), name)
    lay = render_layout(tokenizer, frame, user_text, spans)
    k = v = None
    if not lay.problem:
        cache = KVBufferCache.for_spec(spec, lay.length)
        forward(model, cache, lay.ids, want_logits=False)
        k, v = cache.k, cache.v
    state = agent_from_template_kv(name, key or agent_key(name, system_prompt, template_text), system_prompt,
                                   template, lay, k, v, spec.inv_freq, frame=frame, template_key=template_key)
    state.setup_ms = (time.perf_counter() - t0) * 1000.0
    return state
