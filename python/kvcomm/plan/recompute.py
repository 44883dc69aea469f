"""Selective recompute: which prompt tokens a KVCOMM call runs through the model.

On the reuse path the prompt's KV is assembled without the model: the exact prefix S0,
and for every slot an estimate of its tokens and of the agent's own segment after it
(docs/method.md, "Estimating the offset" to "The two paths"). The paper then runs only the last prompt token. Running a
small budget of further tokens against that assembled KV buys fidelity cheaply
(docs/method.md, "Beyond the paper"): their KV becomes what the model computes given the estimated
rest, and every later token reads it. Always recomputed:

- `tail`: the last prompt tokens (1 = the last token only, the method as published);
- every slot that could not be estimated (a new anchor, no deltas for this agent) and its
  following segment: a *partial* call, whose other slots are still estimated.

Then, in this order, while the budget lasts:

- `segments`: the agent's own template segments after each estimated slot, last first
  (the chat suffix right before the first token, then earlier instructions). The
  estimate's error is largest there (an ablation: without segment offsets first-token
  agreement falls from 83% to 41%), and they are a small share of a prompt;
- `first=K`: the first K tokens of each estimated slot, where a content turns from the
  prefix it was encoded behind to the prompt it now sits in;
- `segfirst=K`: the first K tokens of the agent's segment after each estimated slot (with
  `first=K` this is EPIC's choice: the first tokens of every chunk that was encoded apart);
- `spread`: placeholder tokens the anchors disagree on most (kvcomm.ops.token_spread);
- `deviation`: the tokens whose KV deviates most from what the model computes for them, as
  CacheBlend selects them: the backend first runs layers 0..`layer` (default 1) over every
  token after S0 against the assembled KV (a *probe*; those layers then hold the computed
  KV for every token), the deviation of a token is the squared L2 distance between its
  assembled and computed K and V at layer `layer`, and the highest are recomputed through
  every layer. The probe's cost is counted apart (AgentCall.probed_tokens).

`budget` caps these policy tokens as a fraction of the tokens after S0 (None: no cap for
segments and first-K; `spread` and `deviation` need a budget, or they would recompute every
token).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# The policy KVCommEngine and the `kvcomm` command use unless told otherwise.
DEFAULT_POLICY = "none"

_PART = re.compile(r"^(segments|spread|deviation|none|first=\d+|segfirst=\d+|layer=\d+|tail=\d+|budget=[0-9.]+)$")


@dataclass(frozen=True)
class RecomputePolicy:
    segments: bool = False
    first: int = 0
    spread: bool = False
    budget: float | None = None
    tail: int = 1
    segfirst: int = 0
    deviation: bool = False
    layer: int = 1          # the probe's last layer for `deviation` (0-based)

    def __post_init__(self):
        if isinstance(self.tail, bool) or not isinstance(self.tail, int) or self.tail < 1:
            raise ValueError(f"recompute tail must be an int >= 1 (prompt tokens at the end), got {self.tail!r}")
        for name in ("first", "segfirst"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"recompute {name} must be an int >= 0, got {n!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"recompute layer must be an int >= 0 (the probe's last layer), got {self.layer!r}")
        if self.deviation and self.budget is None:
            raise ValueError("recompute 'deviation' needs a budget (e.g. 'deviation,budget=0.15'): it ranks "
                             "every token after S0")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and 0 <= self.budget <= 1):
            raise ValueError(f"recompute budget must be a fraction in [0, 1] or None, got {self.budget!r}")
        if self.spread and self.budget is None:
            raise ValueError("recompute 'spread' needs a budget (e.g. 'spread,budget=0.1'): it ranks "
                             "every placeholder token")

    @classmethod
    def parse(cls, text: "str | RecomputePolicy | None") -> "RecomputePolicy":
        """'none' (the last token only), or comma-separated parts: 'segments', 'first=K',
        'segfirst=K', 'spread', 'deviation', 'layer=L', 'budget=F', 'tail=N', e.g.
        'segments,first=4,spread,budget=0.1' or 'deviation,budget=0.15'."""
        if text is None:
            text = DEFAULT_POLICY
        if isinstance(text, RecomputePolicy):
            return text
        if not isinstance(text, str):
            raise ValueError(f"recompute policy must be a string or RecomputePolicy, got {type(text).__name__}")
        kw: dict = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if not _PART.match(part):
                raise ValueError(f"recompute policy {text!r}: unknown part {part!r}; use 'none' or parts "
                                 "'segments', 'first=K', 'segfirst=K', 'spread', 'deviation', 'layer=L', "
                                 "'budget=F', 'tail=N'")
            if part == "none":
                continue
            if "=" in part:
                key, value = part.split("=", 1)
                kw[key] = float(value) if key == "budget" else int(value)
            else:
                kw[part] = True
        return cls(**kw)

    def describe(self) -> str:
        parts = (["segments"] if self.segments else []) + ([f"first={self.first}"] if self.first else [])
        parts += [f"segfirst={self.segfirst}"] if self.segfirst else []
        parts += ["spread"] if self.spread else []
        parts += ["deviation"] + ([f"layer={self.layer}"] if self.layer != 1 else []) if self.deviation else []
        parts += [f"budget={self.budget:g}"] if self.budget is not None else []
        parts += [f"tail={self.tail}"] if self.tail != 1 or not parts else []
        return ",".join(parts) if parts != ["tail=1"] else "none"

    @property
    def wants_spread(self) -> bool:
        return self.spread

    @property
    def wants_probe(self) -> bool:
        """Whether positions depend on a probe of the early layers (`deviation` with a budget
        that can choose a token)."""
        return self.deviation and bool(self.budget)

    @property
    def inside(self) -> bool:
        """Whether the policy chooses tokens inside the prompt (not only a suffix)."""
        return bool(self.segments or self.first or self.segfirst or self.spread or self.deviation)


@dataclass
class SlotPlan:
    """One slot of a call: its token span, its following segment, and whether its KV is
    estimated (else computed in context)."""
    name: str
    span: tuple[int, int]
    segment: tuple[int, int]
    estimated: bool
    spread: "object | None" = None   # float32 [n] tensor when the policy asked for it
    cached: bool = False             # in the backend's prefix cache with its segment: given, not estimated
    head: int | None = None          # estimated: only the first `head` tokens (the rest and the segment computed)

    @property
    def computed_from(self) -> int | None:
        """The first position of the slot (or its segment) the model computes; None when none is."""
        if not self.estimated:
            return self.span[0]
        return None if self.head is None else self.span[0] + self.head


@dataclass
class Selection:
    positions: list[int]
    counts: dict = field(default_factory=dict)   # group -> tokens it added


def select_positions(policy: RecomputePolicy, slots: list[SlotPlan], s0: int, total: int,
                     deviation=None) -> Selection:
    """Sorted prompt positions to run through the model, and how many each group added.
    Positions before `s0` (the exact prefix) are never chosen. deviation: per position
    p in [s0, total) the probe's deviation at index p - s0 (a sequence or float tensor);
    None (no probe yet) adds no `deviation` tokens."""
    chosen: set[int] = set()
    counts: dict[str, int] = {}

    def add(group: str, positions) -> int:
        new = [p for p in positions if s0 <= p < total and p not in chosen]
        chosen.update(new)
        counts[group] = counts.get(group, 0) + len(new)
        return len(new)

    add("tail", range(max(s0, total - policy.tail, 1), total))
    if not chosen:   # the whole prompt is S0: the last token still has to run
        add("tail", [total - 1])
    for s in slots:
        if s.computed_from is not None:   # computed, or estimated for its head only
            add("slots", range(s.computed_from, s.span[1]))
            add("slots", range(*s.segment))
    # (+1e-9: a budget written as k/n of the tokens must give k, not k - 1 after rounding)
    cap = math.inf if policy.budget is None else math.floor(policy.budget * max(total - s0, 0) + 1e-9)
    used = 0

    def room() -> float:
        return cap - used

    estimated = [s for s in slots if s.estimated and not s.cached]
    if policy.segments:
        for s in reversed(estimated):
            new = [p for p in range(*s.segment) if p not in chosen]
            if new and room() >= len(new):   # whole segments only
                used += add("segments", new)
    if policy.first:
        for s in estimated:
            a, b = s.span
            k = min(policy.first, b - a)
            if room() <= 0:
                break
            k = int(min(k, room()))
            used += add("first", range(a, a + k))
    if policy.spread and room() > 0:
        scored = []
        for s in estimated:
            if s.spread is None:
                continue
            a = s.span[0]
            for i, v in enumerate(s.spread.tolist()):
                if a + i not in chosen:
                    scored.append((-v, a + i))
        scored.sort()
        take = int(min(room(), len(scored)))
        used += add("spread", [p for _, p in scored[:take]])
    if policy.segfirst:
        for s in estimated:
            a, b = s.segment
            if room() <= 0:
                break
            k = int(min(policy.segfirst, b - a, room()))
            used += add("segfirst", range(a, a + k))
    if policy.deviation and deviation is not None and room() > 0:
        values = deviation.tolist() if hasattr(deviation, "tolist") else list(deviation)
        # highest deviation first; ties by position so the choice is deterministic
        scored = sorted((-float(values[p - s0]), p) for p in range(s0, total) if p not in chosen)
        take = int(min(room(), len(scored)))
        used += add("deviation", [p for _, p in scored[:take]])
    return Selection(sorted(chosen), counts)
