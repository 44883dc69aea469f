"""KVCommEngine: one agent call = decide per slot -> assemble -> run the chosen tokens -> decode -> capture.

docs/method.md sections 4-6 and 9 on a Hugging Face model. Per call, in kvcomm mode:
1. render the agent's prompt and tokenize it once; locate slots and segments;
2. for each slot, the content's base KV (a captured reply, or encoded behind a
   header) and the pool's share-or-anchor decision, both once per request;
3. per slot, estimate (shared, and the pool holds deltas for this agent) or compute in
   context (kvcomm.engine.paths). The exact S0 is copied and the core writes the
   estimated KV of every estimated slot and its following segment straight into the
   cache buffer; then one forward runs the tokens the recompute policy chooses
   (kvcomm.engine.recompute: at least the last token, plus every computed slot and its
   segment) at their positions against the rest (kvcomm.engine.scatter).
   reuse path: every slot estimated; partial: some estimated, some computed;
   dense: none estimated - real prefill after the exact S0.
   Computed slots record their KV as neutral-frame deltas into their anchors;
4. first token from the last logits (TTFT stops here), then model.generate;
5. the reply's KV is cut from the cache and decided against its slot's pool.
mode="dense" is the baseline: full prefill of the whole prompt, no pool, no capture.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from .. import hf
from .._C import AnchorPool, PoolConfig
from ..hf.cache import KVBufferCache
from .agent import AgentState, build_agent
from .bases import HeaderEncoder
from .kv import forward, forward_logits, neutral_pair
from .modes import MODES
from .paths import CallPlan, assemble, plan_slots, record
from .recompute import RecomputePolicy, select_positions
from .scatter import forward_scattered
from .request import Content, Reply, RequestState, decision_numbers
from .template import AGENT_NAME_RE, CONDITION, CURRENT, HISTORY, QUESTION, TemplateError, fill, render_layout
from .template import check_inputs, special_texts

_KIND_OF = {QUESTION: "question", CONDITION: "condition", CURRENT: "reply", HISTORY: "reply"}


@dataclass
class AgentCall:
    """What one call did. Times in milliseconds."""
    agent: str
    text: str
    mode: str                     # "kvcomm" or "dense"
    path: str                     # "reuse" or "dense"
    reason: str                   # why this path
    ttft_ms: float                # everything the agent waited for before its first token
    timings: dict                 # encode, decide, estimate, forward, first_token, record, decode, capture, total
    first_token_id: int
    first_logits: torch.Tensor | None
    prompt_tokens: int
    new_tokens: int
    slot_decisions: dict          # slot -> decision reason
    token_ids: list = field(default_factory=list)   # generated ids (first token included)
    slot_gates: dict = field(default_factory=dict)  # slot -> the decision's numbers (decision_numbers)
    # Token accounting (docs/method.md section 6): the exact prefix copied from the agent's
    # S0 cache, prompt tokens run through the model in this call, and content tokens this
    # call encoded behind a header (a content's first consumer pays for its base).
    s0_tokens: int = 0
    computed_tokens: int = 0
    encoded_tokens: int = 0
    recomputed: dict = field(default_factory=dict)     # reuse/partial: group -> tokens (recompute.py)
    slot_anchors: dict = field(default_factory=dict)   # estimated slot -> anchor ids used
    # Only with call(..., reply_logits=K): float32 [min(K, reply tokens), vocab]; row 0 is the
    # first token's logits, row j the logits for reply token j given reply tokens [0, j).
    reply_logits: torch.Tensor | None = field(default=None, repr=False)
    # Only with call(..., keep_cache=True): the call's KVBufferCache (prompt, then the
    # reply's fed-back tokens) and its PromptLayout (token ids, slot spans, segments).
    cache: KVBufferCache | None = field(default=None, repr=False)
    layout: object = field(default=None, repr=False)


def _longest_input(lay, inputs: dict) -> str:
    """'; longest input: {name} (N tokens)' for a too-long prompt, so the caller knows
    which content to shorten (characters when the layout has no clean spans)."""
    if lay.spans and len(lay.spans) == len(inputs):
        name, a, b = max(lay.spans, key=lambda s: s[2] - s[1])
        return f"; longest input: {{{name}}} ({b - a} tokens)"
    if inputs:
        name = max(inputs, key=lambda k: len(inputs[k]))
        return f"; longest input: {{{name}}} ({len(inputs[name])} characters)"
    return ""


class _Clock:
    def __init__(self):
        self.t = {k: 0.0 for k in ("encode", "decide", "estimate", "forward", "first_token",
                                   "record", "decode", "capture")}
        self._last = time.perf_counter()
        self.encoded_tokens = 0   # content tokens this call encoded behind a header

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        self.t[key] = self.t.get(key, 0.0) + (now - self._last) * 1000.0
        self._last = now


class KVCommEngine:
    """KVCOMM on a transformers model. See the module docstring for one call.

    pool_config: kvcomm.PoolConfig (defaults of docs/method.md section 4 when None);
    pool: an existing AnchorPool (e.g. loaded from disk) instead;
    lead_ins: per content kind ("question", "condition", "reply") header lead-in text.
    Reuse can be refused for the whole engine with refuse_reuse(reason): every
    kvcomm-mode call then runs dense with that reason. The correctness gate
    (kvcomm.engine.gate.apply) uses it; nothing is refused by default.
    recompute: which prompt tokens a KVCOMM call runs through the model besides the slots
      it cannot estimate (kvcomm.engine.recompute): a RecomputePolicy or its string form,
      e.g. "none" (the last token only, the method as published), "tail=64",
      "segments,first=4,spread,budget=0.1".
    exact_tail: the same as recompute="tail=N" (kept for existing callers).
    partial: a call with some slots that cannot be estimated still estimates the others
      and computes only those in context (default); False runs such calls fully dense.
    """

    def __init__(self, model, tokenizer, pool_config: PoolConfig | None = None, *,
                 pool: AnchorPool | None = None, lead_ins: dict | None = None,
                 recompute: RecomputePolicy | str | None = None, exact_tail: int | None = None,
                 partial: bool = True):
        if recompute is not None and exact_tail is not None:
            raise ValueError("give recompute or exact_tail, not both (exact_tail=N is recompute='tail=N')")
        self.recompute = RecomputePolicy.parse(recompute)
        if exact_tail is not None:
            self.exact_tail = exact_tail
        self.partial = bool(partial)
        self.spec = hf.enable(model)
        self.model = model
        self.tokenizer = tokenizer
        if pool is None:
            s = self.spec
            pool = AnchorPool(pool_config if pool_config is not None else
                              PoolConfig(layers=s.num_layers, kv_heads=s.kv_heads, head_dim=s.head_dim))
        self.pool = pool
        self.encoder = HeaderEncoder(model, tokenizer, self.spec, lead_ins)
        self.agents: dict[str, AgentState] = {}
        self.request: RequestState | None = None
        self._requests = 0
        self._paths: Counter = Counter()
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._blank: dict[int, bool] = {}
        # Optional static / CUDA-graph last-token step of the reuse path (use_static_step).
        self.static_step = None
        self._special_texts = special_texts(tokenizer)
        self._refusal: str | None = None

    @property
    def recompute(self) -> RecomputePolicy:
        return self._recompute

    @recompute.setter
    def recompute(self, policy: RecomputePolicy | str | None) -> None:
        self._recompute = RecomputePolicy.parse(policy)

    @property
    def exact_tail(self) -> int:
        return self._recompute.tail

    @exact_tail.setter
    def exact_tail(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"exact_tail must be an int >= 1 (prompt tokens the reuse path runs), got {n!r}")
        self._recompute = dataclasses.replace(self._recompute, tail=n)

    def sibling(self, pool: AnchorPool | None = None) -> "KVCommEngine":
        """A new engine on the same model and tokenizer, with this engine's pool settings,
        lead-ins and recompute policy, but its own pool (a fresh one with the same config
        unless `pool` is given), agents, requests and reuse refusal. For running two
        measurements side by side without either seeing the other's anchors."""
        return KVCommEngine(self.model, self.tokenizer,
                            pool=pool if pool is not None else AnchorPool(self.pool.config),
                            lead_ins=self.encoder.lead_ins, recompute=self.recompute, partial=self.partial)

    # ------------------------------------------------------------------ setup

    def add_agent(self, name: str, system_prompt: str, template: str) -> None:
        """Registers an agent; computes its template KV (exact S0 + segments) once."""
        if not isinstance(name, str) or not AGENT_NAME_RE.fullmatch(name):
            raise ValueError(f"agent name {name!r}: use letters, digits, '_' or '-' (it appears in "
                             "{agent_<name>_current})")
        if name in self.agents:
            raise ValueError(f"agent {name!r} already added")
        self.agents[name] = build_agent(self.model, self.tokenizer, self.spec, name, system_prompt or "",
                                        template)

    def new_request(self) -> None:
        """Starts a request: per-request bases, decisions and replies are dropped."""
        self._requests += 1
        self.request = RequestState(index=self._requests)

    def next_round(self) -> None:
        """This round's replies become {agent_<id>_history} of the next round."""
        if self.request is None:
            self.new_request()
        self.request.next_round()

    # ------------------------------------------------------------------ one call

    def call(self, agent: str, inputs: dict, *, mode: str = "kvcomm", max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0,
             return_first_logits: bool = False, reply_ids: list[int] | None = None,
             capture: bool = True, keep_cache: bool = False, reply_logits: int = 0) -> AgentCall:
        """reply_ids: a forced reply (benchmarks). The first token is still computed and
        timed as usual; the reply is then these tokens instead of a generated one, fed
        through the model in one forward in kvcomm mode and captured like a generated
        reply (dense mode captures nothing, so it does not feed them).

        capture=False leaves the request's replies and the pool's reply slots alone: for
        re-running a call to compare it (otherwise the re-run's reply replaces the
        original as the base of {agent_<name>_current} and goes through the decision).

        keep_cache=True fills AgentCall.cache (this call's KVBufferCache) and
        AgentCall.layout (its PromptLayout), e.g. to compare the reuse path's KV with a
        dense call's; by default the call keeps neither.

        reply_logits=K fills AgentCall.reply_logits with the logits of the reply's first K
        positions (teacher forcing when reply_ids is given: the forced tokens are fed to
        this call's cache in both modes), e.g. to compare a KVCOMM call with a dense one
        on identical inputs and an identical reply."""
        if isinstance(reply_logits, bool) or not isinstance(reply_logits, int) or reply_logits < 0:
            raise ValueError(f"reply_logits must be an int >= 0, got {reply_logits!r}")
        if reply_ids is not None:
            reply_ids = [int(t) for t in reply_ids]
            if not reply_ids:
                raise ValueError("reply_ids must hold at least one token")
            max_new_tokens = len(reply_ids)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if agent not in self.agents:
            raise KeyError(f"unknown agent {agent!r}; add it with add_agent first")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if isinstance(inputs, Mapping):
            inputs = dict(inputs)
        check_inputs(self.agents[agent].template, inputs, agent, self._special_texts)
        if self.request is None:
            self.new_request()
        with torch.inference_mode():
            return self._call(self.agents[agent], dict(inputs), mode, max_new_tokens, do_sample,
                              float(temperature), return_first_logits, reply_ids, capture, keep_cache,
                              reply_logits)

    def _call(self, st: AgentState, inputs, mode, max_new_tokens, do_sample, temperature, want_logits,
              reply_ids=None, capture=True, keep_cache=False, reply_logits=0):
        clock = _Clock()
        start = clock._last
        user_text, cspans = fill(st.template, inputs, st.name)
        lay = render_layout(self.tokenizer, st.frame, user_text, cspans)
        T = lay.length
        if T + max_new_tokens > self.spec.max_positions:
            raise TemplateError(f"agent {st.name!r}: prompt of {T} tokens + {max_new_tokens} new tokens exceeds "
                                f"the model's context of {self.spec.max_positions} positions"
                                + _longest_input(lay, inputs))
        if T < 2:
            raise TemplateError(f"agent {st.name!r}: the prompt has fewer than 2 tokens")
        capacity = T + max_new_tokens + 1
        clock.lap("encode")

        slot_decisions: dict[str, str] = {}
        slot_anchors: dict[str, list] = {}
        contents: list[Content] = []
        plan: CallPlan | None = None
        recomputed: dict = {}
        s0_tokens = 0
        if mode == "dense":
            path, reason = "dense", "baseline"
            cache, logits = self._prefill(st, lay, capacity, use_prefix=False)
            computed = T
            clock.lap("forward")
        else:
            reason = self._refusal or self._unaligned(st, lay, max_new_tokens)
            if reason is None:
                contents = self._contents(st, lay, clock)
                plan = plan_slots(self.pool, st.key, lay, contents, slot_decisions)
            path = "dense"
            if plan is not None and (plan.any_estimated or not contents) and (self.partial or not plan.computed):
                cache = self._reuse_buffer(capacity)
                assemble(self.pool, st, lay, contents, plan, cache, self.spec.inv_freq,
                         self.recompute.wants_spread, slot_decisions, slot_anchors)
                clock.lap("estimate")
                if plan.any_estimated or not contents:
                    sel = select_positions(self.recompute, plan.slots, st.s0, T)
                    logits = self._run_positions(cache, lay, sel.positions)
                    path = "partial" if plan.computed else "reuse"
                    recomputed, computed, s0_tokens = sel.counts, len(sel.positions), st.s0
                    reason = (f"partial: {plan.reason()}" if plan.computed else
                              "all slots shared" if contents else "no slots: exact prefix")
            if path == "dense":
                reason = reason or plan.reason()
                cache, logits, s0_tokens = self._prefill(st, lay, capacity, use_prefix=True, with_prefix=True)
                computed = T - s0_tokens
            clock.lap("forward")

        first = self._first_token(logits, do_sample, temperature)
        clock.lap("first_token")
        ttft_ms = (time.perf_counter() - start) * 1000.0

        if plan is not None and path != "reuse":
            which = range(len(contents)) if path == "dense" else plan.computed
            record(self.pool, st, lay, cache, contents, plan, which, self.spec.inv_freq, slot_decisions)
            clock.lap("record")
        tf_logits = None
        if reply_ids is not None:
            tokens, tf_logits = self._force_reply(cache, reply_ids, mode, reply_logits)
        else:
            tokens, tf_logits = self._decode(lay.ids, first, cache, max_new_tokens, do_sample, temperature,
                                             reply_logits)
        clock.lap("decode")
        lo, hi = self._reply_span(tokens)
        text = self.tokenizer.decode(tokens[lo:hi], skip_special_tokens=True)
        if mode == "kvcomm" and capture and hi > lo and self._exact_range_ok(T + len(tokens)) and not self._refusal:
            self._capture(st, cache, T, tokens, lo, hi, text)
            clock.lap("capture")

        self._paths["baseline" if mode == "dense" else path] += 1
        timings = dict(clock.t)
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return AgentCall(agent=st.name, text=text, mode=mode, path=path, reason=reason, ttft_ms=ttft_ms,
                         timings=timings, first_token_id=int(first),
                         first_logits=logits.detach().cpu() if want_logits else None,
                         prompt_tokens=T, new_tokens=len(tokens), slot_decisions=slot_decisions,
                         token_ids=tokens, slot_gates={c.slot: c.gate for c in contents},
                         s0_tokens=s0_tokens, computed_tokens=computed, encoded_tokens=clock.encoded_tokens,
                         recomputed=recomputed, slot_anchors=slot_anchors,
                         reply_logits=self._reply_logits(logits, tf_logits, len(tokens), reply_logits),
                         cache=cache if keep_cache else None, layout=lay if keep_cache else None)

    # ------------------------------------------------------------------ refusing reuse

    def refuse_reuse(self, reason: str | None) -> None:
        """reason: every later kvcomm-mode call runs dense with this reason, and the pool
        is not used at all (no decisions, anchors or captures); None lifts the refusal.
        The correctness gate (kvcomm.engine.gate.apply) sets it when reuse disagrees with
        dense on this model."""
        if reason is not None and (not isinstance(reason, str) or not reason.strip()):
            raise ValueError(f"refuse_reuse: reason must be a non-empty string or None, got {reason!r}")
        self._refusal = reason

    @property
    def reuse_refusal(self) -> str | None:
        """The reason given to refuse_reuse, or None when reuse is allowed."""
        return self._refusal

    # ------------------------------------------------------------------ per-slot content

    def _exact_range_ok(self, n: int) -> bool:
        return self.spec.exact_positions is None or n <= self.spec.exact_positions

    def _unaligned(self, st: AgentState, lay, max_new_tokens: int) -> str | None:
        if lay.problem:
            return lay.problem
        if not self._exact_range_ok(lay.length + max_new_tokens):
            return (f"prompt + reply longer than {self.spec.exact_positions} positions, where "
                    f"{self.spec.rope_type} RoPE key moves stop being exact")
        return st.alignment_problem(lay)

    def _contents(self, st: AgentState, lay, clock: _Clock) -> list[Content]:
        out = []
        for i, ph in enumerate(st.template.placeholders):
            out.append(self._content(ph, lay.span_ids(i), clock))
        return out

    def _content(self, ph, ids: tuple, clock: _Clock) -> Content:
        req = self.request
        key = (ph.name, ids)
        found = req.contents.get(key)
        if found is not None:
            return found
        base, source = None, "header"
        if ph.kind in (CURRENT, HISTORY):
            rep = (req.current if ph.kind == CURRENT else req.history).get(ph.owner)
            if rep is not None and rep.ids == ids:
                base, source = (rep.k, rep.v), "reply"
        if base is None:
            kind = _KIND_OF[ph.kind]
            base = req.encoded.get((kind, ids))
            if base is None:
                base = self.encoder.encode(kind, ids)
                req.encoded[(kind, ids)] = base
                clock.encoded_tokens += len(ids)
        clock.lap("encode")
        content = self._decide(ph.name, ids, base[0], base[1], source)
        req.contents[key] = content
        clock.lap("decide")
        return content

    def _decide(self, slot: str, ids: tuple, k: torch.Tensor, v: torch.Tensor, source: str) -> Content:
        d = self.pool.decide(slot, v)
        content = Content(slot=slot, ids=ids, base_k=k, base_v=v, source=source, share=bool(d.share),
                          reason=d.reason, gate=decision_numbers(d, len(ids)))
        if not d.share:
            content.anchor_id = self.pool.add_anchor(slot, k, v)
        return content

    # ------------------------------------------------------------------ the two paths

    def _prefill(self, st: AgentState, lay, capacity: int, use_prefix: bool, with_prefix: bool = False):
        """Dense prefill, after the exact S0 KV when the prompt starts with it.
        (cache, logits), plus the S0 tokens copied when with_prefix."""
        cache = KVBufferCache.for_spec(self.spec, capacity)
        p = 0
        if use_prefix and st.s0_k is not None:
            limit = min(st.s0, lay.length - 1)
            ref = st.layout.ids
            while p < limit and lay.ids[p] == ref[p]:
                p += 1
            cache.k[:, :, :p].copy_(st.s0_k[:, :, :p])
            cache.v[:, :, :p].copy_(st.s0_v[:, :, :p])
            cache.set_length(p)
        logits = forward(self.model, cache, lay.ids[p:])
        return (cache, logits, p) if with_prefix else (cache, logits)

    # ------------------------------------------------------------------ static last-token step

    def use_static_step(self, capacity: int, *, bucket: int = 512, capture: bool | None = None,
                        prepare: bool = True):
        """Runs the reuse path's last-token forward over one persistent KV buffer of
        `capacity` tokens (prompt + reply), CUDA-graph captured when the model is on CUDA
        (capture=None), eager otherwise (see engine/static_step.py). Calls that need more
        than `capacity` use the ordinary path. Returns the step; None turns it off."""
        from .static_step import StaticOneTokenStep
        if capacity is None:
            self.static_step = None
            return None
        step = StaticOneTokenStep(self.model, self.spec, capacity, bucket=bucket, capture=capture)
        if prepare:
            step.prepare()
        self.static_step = step
        return step

    def _reuse_buffer(self, capacity: int) -> KVBufferCache:
        step = self.static_step
        if step is not None and step.fits(capacity):
            return step.take()
        return KVBufferCache.for_spec(self.spec, capacity)

    def _run_positions(self, cache: KVBufferCache, lay, positions: list[int]) -> torch.Tensor:
        """The model over the chosen prompt positions against the assembled KV; the last
        token's logits. Only the last token: the static / CUDA-graph step when set."""
        T = lay.length
        step = self.static_step
        if positions == [T - 1] and step is not None and step.owns(cache):
            return step(cache, lay.ids[-1], T - 1)
        return forward_scattered(self.model, cache, [lay.ids[p] for p in positions], positions, T)[0]

    def _force_reply(self, cache: KVBufferCache, reply_ids: list[int], mode: str, want: int):
        """A forced reply: fed to the cache in kvcomm mode (its KV is captured) and, with
        teacher-forced logits asked for, in dense mode too. (tokens, logits [rows, V] | None)."""
        rows = max(0, min(want, len(reply_ids)) - 1)
        if mode == "kvcomm":
            feed = reply_ids
        elif rows:
            feed = reply_ids[:rows]
        else:
            return list(reply_ids), None
        logits = forward_logits(self.model, cache, feed, len(feed) if rows else 0)
        return list(reply_ids), (logits[:rows] if rows else None)

    @staticmethod
    def _reply_logits(first: torch.Tensor, rest: torch.Tensor | None, n_tokens: int, want: int):
        if want <= 0:
            return None
        rows = [first.detach().float().cpu().view(1, -1)]
        if rest is not None and want > 1:
            rows.append(rest[: min(want, n_tokens) - 1].detach().float().cpu())
        return torch.cat(rows)[: max(1, min(want, n_tokens))]

    # ------------------------------------------------------------------ decoding and capture

    def _first_token(self, logits: torch.Tensor, do_sample: bool, temperature: float) -> int:
        if not do_sample:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1))

    def _decode(self, prompt_ids, first: int, cache, max_new_tokens: int, do_sample: bool,
                temperature: float, want_logits: int = 0):
        """Generated tokens (first included) and, when asked, the logits of steps 2..want."""
        tokens = [first]
        if first in self.eos_ids or max_new_tokens == 1:
            return tokens, None
        gc = GenerationConfig(max_new_tokens=max_new_tokens - 1, do_sample=do_sample,
                              eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        if do_sample:  # plain temperature sampling, as for the first token
            gc.temperature, gc.top_k, gc.top_p = temperature, 0, 1.0
        if want_logits > 1:
            gc.output_logits, gc.return_dict_in_generate = True, True
        x = torch.tensor([list(prompt_ids) + [first]], dtype=torch.long, device=cache.k.device)
        out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), past_key_values=cache,
                                  generation_config=gc)
        if want_logits > 1:
            steps = out.logits[: want_logits - 1]
            logits = torch.cat([t[0:1].float() for t in steps]) if steps else None
            return tokens + out.sequences[0, x.shape[1]:].tolist(), logits
        return tokens + out[0, x.shape[1]:].tolist(), None

    def _is_blank(self, token_id: int) -> bool:
        blank = self._blank.get(token_id)
        if blank is None:
            blank = self._blank[token_id] = self.tokenizer.decode([token_id]).strip() == ""
        return blank

    def _reply_span(self, tokens: list[int]) -> tuple[int, int]:
        """[lo, hi) of the reply's content in the generated tokens: no EOS, and no
        whitespace-only tokens at either end. Edge whitespace would merge with the
        newline around a placeholder in the next agent's prompt (one token across
        the slot edge), which forces that agent onto the dense path."""
        lo, hi = 0, len(tokens)
        if hi and tokens[-1] in self.eos_ids:
            hi -= 1
        while hi > lo and self._is_blank(tokens[hi - 1]):
            hi -= 1
        while lo < hi and self._is_blank(tokens[lo]):
            lo += 1
        return lo, hi

    def _capture(self, st: AgentState, cache, T: int, tokens: list[int], lo: int, hi: int,
                 text: str) -> None:
        """The reply's KV, cut from this call's cache. Every generated token but the
        last was fed back; if the last one is content it still needs its KV
        (docs/method.md section 8), computed here with one more forward."""
        if cache.length < T + hi:
            forward(self.model, cache, tokens[cache.length - T:hi], want_logits=False)
        k, v = neutral_pair(cache, T + lo, T + hi, self.spec.inv_freq)
        ids = tuple(tokens[lo:hi])
        self.request.current[st.name] = Reply(st.name, text, ids, k, v)
        slot = f"agent_{st.name}_current"
        if (slot, ids) not in self.request.contents:
            self.request.contents[(slot, ids)] = self._decide(slot, ids, k, v, "reply")

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict:
        pool = self.pool
        return {
            "anchors": pool.size(),
            "bytes": pool.memory_bytes(),
            "evictions": pool.evictions,
            "slots": {s: pool.slot_size(s) for s in pool.slots()},
            "calls": {"reuse": self._paths["reuse"], "partial": self._paths["partial"], "dense": self._paths["dense"],
                      "baseline": self._paths["baseline"]},
            "requests": self._requests,
            "agents": {n: {"setup_ms": a.setup_ms, "s0_tokens": a.s0, "template_problem": a.problem}
                       for n, a in self.agents.items()},
        }
