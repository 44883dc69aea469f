"""The paper's TTFT setting (docs/method.md, "What the paper reports"): N fully connected agents in a chain of calls.

Agent i (1-based) reads the shared input and the replies of agents 1..i-1, behind its
own prefix:

    prompt_i = prefix (P tokens) + input (I tokens) + output_1 + ... + output_{i-1} (O tokens each)

so its nominal length is P + I + O*(i-1); the paper uses P=512, I=1024, O=512, N=5
(the last agent reads 3584 tokens). Here:
- prefix = everything before the input in the rendered prompt: the chat template's
  system header, a system prompt padded with filler words, the user header and the
  template's "Task:" line. The padding is fitted so it is exactly P tokens (S0 of
  docs/method.md, "Terms");
- input = a fresh synthetic text of exactly I tokens per request;
- output_j = a fresh synthetic reply of exactly O tokens per request and agent.
Between the slots sit a few separator tokens ("Agent j said:") and the chat template's
assistant header ends the prompt; `overhead_tokens` counts them, so a prompt's real
length is nominal + overhead. Agent i's prompt does not depend on N (no agent is told
the team size), so the first N agents of a larger run are exactly an N-agent run.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvcomm.plan.template import chat_frame, fill, markers, parse_template, render_layout
from .texts import TextMaker

QUESTION_SLOT = "user_question"


def agent_name(i: int) -> str:
    return f"a{i}"


def reply_slot(i: int) -> str:
    return f"agent_{agent_name(i)}_current"


def template_for(i: int) -> str:
    """Agent i's user turn: the input, then every earlier agent's reply."""
    parts = ["Task:\n{" + QUESTION_SLOT + "}\n"]
    for j in range(1, i):
        parts.append(f"\nAgent {j} said:\n{{{reply_slot(j)}}}\n")
    parts.append("\nYour turn.")
    return "".join(parts)


@dataclass(frozen=True)
class TTFTSetting:
    agents: int = 5
    prefix: int = 512
    input: int = 1024
    output: int = 512

    def __post_init__(self):
        for name in ("agents", "prefix", "input", "output"):
            if getattr(self, name) < 1:
                raise ValueError(f"TTFT setting: {name} must be at least 1, got {getattr(self, name)}")

    def nominal_tokens(self, i: int) -> int:
        """Prefix + input + outputs of the i-1 earlier agents (the paper's arithmetic)."""
        if not 1 <= i <= self.agents:
            raise ValueError(f"agent index {i} outside 1..{self.agents}")
        return self.prefix + self.input + self.output * (i - 1)

    def as_dict(self) -> dict:
        return {"agents": self.agents, "prefix": self.prefix, "input": self.input, "output": self.output,
                "topology": "fully_connected"}


@dataclass
class AgentPrompt:
    index: int                  # 1-based
    name: str
    system_prompt: str
    template: str


@dataclass
class RequestTexts:
    """The contents of one request: the input and every agent's forced reply."""
    question: str
    question_ids: list[int]
    replies: list[str]                       # replies[i-1] = agent i's reply text
    reply_ids: list[list[int]] = field(default_factory=list)

    def inputs_for(self, i: int) -> dict[str, str]:
        out = {QUESTION_SLOT: self.question}
        for j in range(1, i):
            out[reply_slot(j)] = self.replies[j - 1]
        return out


class SettingBuilder:
    """Agent prompts with an exact prefix length and per-request texts, for one tokenizer."""

    def __init__(self, tokenizer, setting: TTFTSetting, seed: int = 0):
        self.tokenizer = tokenizer
        self.setting = setting
        self.seed = seed
        self.maker = TextMaker(tokenizer)
        self.agents = [self._agent(i) for i in range(1, setting.agents + 1)]

    # -- prompts ---------------------------------------------------------------------

    def _s0(self, system: str, template: str) -> int:
        t = parse_template(template)
        text, spans = fill(t, markers(t))
        lay = render_layout(self.tokenizer, chat_frame(self.tokenizer, system), text, spans)
        if lay.problem:
            raise RuntimeError(f"kvcomm bench: the benchmark template does not tokenize cleanly: {lay.problem}")
        return lay.s0

    def _agent(self, i: int) -> AgentPrompt:
        """The system prompt is padded with filler words until S0 is exactly `prefix` tokens
        (each filler word is one token; a few rounds absorb any merge at the edges)."""
        template = template_for(i)
        head = f"You are agent {i}."
        rng = random.Random(f"{self.seed}:prefix:{i}")
        base = self._s0(head, template)
        want = self.setting.prefix
        if want < base:
            raise ValueError(f"TTFT setting: prefix {want} is shorter than the {base} tokens the chat template "
                             "and the agent's header take; use --prefix >= " + str(base))
        pad = self.maker.words_text(max(want - base, 1), rng).split(" ")
        n = want - base
        for _ in range(8):
            system = head + (" " + " ".join(pad[:n]) if n > 0 else "")
            got = self._s0(system, template)
            if got == want:
                return AgentPrompt(i, agent_name(i), system, template)
            n += want - got
            if n < 0:
                break
            while len(pad) < n:
                pad.append(rng.choice(self.maker.words))
        raise RuntimeError(f"kvcomm bench: could not fit agent {i}'s prefix to exactly {want} tokens")

    # -- per-request contents --------------------------------------------------------

    def request(self, index: int) -> RequestTexts:
        """Fresh input and replies for request `index` (deterministic in seed and index)."""
        rng = random.Random(f"{self.seed}:request:{index}")
        q, q_ids = self.maker.make(self.setting.input, rng)
        replies, reply_ids = [], []
        for _ in range(self.setting.agents):
            r, r_ids = self.maker.make(self.setting.output, rng)
            replies.append(r)
            reply_ids.append(r_ids)
        return RequestTexts(q, q_ids, replies, reply_ids)

    # -- the token arithmetic, checked on real prompts -------------------------------

    def layout(self, i: int, texts: RequestTexts):
        a = self.agents[i - 1]
        t = parse_template(a.template)
        text, spans = fill(t, texts.inputs_for(i), a.name)
        return render_layout(self.tokenizer, chat_frame(self.tokenizer, a.system_prompt), text, spans)

    def check(self, texts: RequestTexts) -> list[dict]:
        """Per agent: the real prompt length and the pieces, after checking that S0 is
        `prefix` tokens, the input slot holds exactly the input's ids and each reply
        slot exactly that reply's ids (so captured replies are reused as they are)."""
        s = self.setting
        rows = []
        for a in self.agents:
            lay = self.layout(a.index, texts)
            if lay.problem:
                raise RuntimeError(f"kvcomm bench: agent {a.name}'s prompt does not tokenize cleanly: {lay.problem}")
            if lay.s0 != s.prefix:
                raise RuntimeError(f"kvcomm bench: agent {a.name}'s prefix is {lay.s0} tokens, not {s.prefix}")
            expected = [tuple(texts.question_ids)] + [tuple(texts.reply_ids[j]) for j in range(a.index - 1)]
            for k, want in enumerate(expected):
                if lay.span_ids(k) != want:
                    raise RuntimeError(f"kvcomm bench: agent {a.name}, slot {lay.spans[k][0]}: the prompt holds "
                                       f"{len(lay.span_ids(k))} tokens that differ from the content's {len(want)}")
            nominal = s.nominal_tokens(a.index)
            rows.append({"agent": a.index, "name": a.name, "tokens": lay.length, "nominal_tokens": nominal,
                         "overhead_tokens": lay.length - nominal, "prefix_tokens": lay.s0,
                         "slot_tokens": [b - c for _, c, b in lay.spans]})
        return rows
