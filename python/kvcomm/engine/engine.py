"""KVCommEngine: KVCOMM on a Hugging Face transformers model.

The engine is the transformers backend of the call planner (kvcomm.plan): the planner
decides, the engine runs the model where the plan says and moves KV between the model's
cache and the planner's buffers (a KVBufferCache's `k` / `v` are such buffers). Per call,
in kvcomm mode:
1. render the agent's prompt and tokenize it once; locate slots and segments;
2. the planner's plan: each slot's base (a captured reply, or encoded behind a header by
   this engine, kvcomm.engine.bases) and decision, once per request; the path (reuse,
   partial, dense) and the prompt positions the model runs;
3. reuse / partial: the planner writes the exact S0 and every estimated slot into the
   cache buffer, then one forward runs the chosen tokens at their positions against the
   rest (kvcomm.engine.scatter; the captured static step when only the last token runs);
   dense: a real prefill after the exact S0. Computed slots record their deltas;
4. first token from the last logits (TTFT stops here), then model.generate;
5. the reply's KV is cut from the cache and the planner captures it.
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
from ..plan.defaults import DEFAULT_MIN_ANCHORS, DEFAULT_PARTIAL
from ..plan.planner import Planner, PlanSettings
from ..plan.recompute import RecomputePolicy
from ..plan.replies import BlankTokens, reply_span
from ..plan.state import AgentState, Session
from ..plan.template import AGENT_NAME_RE, TemplateError, check_inputs, fill, render_layout, special_texts
from .agent import build_agent
from .bases import HeaderEncoder
from .kv import forward, forward_logits
from .modes import MODES
from .probe import probe_deviation
from .scatter import forward_scattered


@dataclass
class AgentCall:
    """What one call did. Times in milliseconds."""
    agent: str
    text: str
    mode: str                     # "kvcomm" or "dense"
    path: str                     # "reuse", "partial" or "dense" (kvcomm.plan.planner)
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
    # Token accounting (docs/method.md, "The two paths"): the exact prefix copied from the agent's
    # S0 cache, prompt tokens run through the model in this call, and content tokens this
    # call encoded behind a header (a content's first consumer pays for its base).
    s0_tokens: int = 0
    computed_tokens: int = 0
    encoded_tokens: int = 0
    recomputed: dict = field(default_factory=dict)     # reuse/partial: group -> tokens (kvcomm.plan.recompute)
    slot_anchors: dict = field(default_factory=dict)   # estimated slot -> anchor ids used
    # recompute 'deviation': prompt tokens the early-layer probe ran, through the share
    # probe_fraction of the model's layers only (its cost in full tokens: the product)
    probed_tokens: int = 0
    probe_fraction: float = 0.0
    # Only with call(..., reply_logits=K): float32 [min(K, reply tokens), vocab]; row 0 is the
    # first token's logits, row j the logits for reply token j given reply tokens [0, j).
    reply_logits: torch.Tensor | None = field(default=None, repr=False)
    # Only with call(..., keep_cache=True): the call's KVBufferCache (prompt, then the
    # reply's fed-back tokens) and its PromptLayout (token ids, slot spans, segments).
    cache: KVBufferCache | None = field(default=None, repr=False)
    layout: object = field(default=None, repr=False)
    session: str = ""             # chat(): the conversation the call was placed in


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


def _settings(partial: bool | str, recompute: RecomputePolicy) -> PlanSettings:
    """PlanSettings from the engine's `partial` argument (True, False or "prefix")."""
    if partial == "prefix":
        return PlanSettings(partial=True, recompute=recompute, prefix_only=True)
    if not isinstance(partial, bool):
        raise ValueError(f"partial must be True, False or 'prefix', got {partial!r}")
    return PlanSettings(partial=partial, recompute=recompute)


class _Clock:
    """Per-step timings of one call; the planner calls lap() after each base and decision."""

    def __init__(self):
        self.t = {k: 0.0 for k in ("encode", "decide", "estimate", "forward", "first_token",
                                   "record", "decode", "capture", "encode_after", "probe")}
        self._last = time.perf_counter()

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        self.t[key] = self.t.get(key, 0.0) + (now - self._last) * 1000.0
        self._last = now


class KVCommEngine:
    """KVCOMM on a transformers model. See the module docstring for one call.

    pool_config: kvcomm.PoolConfig; when None, the defaults of docs/method.md ("Deciding")
      with min_anchors=DEFAULT_MIN_ANCHORS ("Beyond the paper");
    pool: an existing AnchorPool (e.g. loaded from disk) instead;
    lead_ins: per content kind ("question", "condition", "reply") header lead-in text.
    Reuse can be refused for the whole engine with refuse_reuse(reason): every
    kvcomm-mode call then runs dense with that reason. The correctness gate
    (kvcomm.engine.gate.apply) uses it; nothing is refused by default.
    recompute: which prompt tokens a KVCOMM call runs through the model besides the slots
      it cannot estimate (kvcomm.plan.recompute): a RecomputePolicy or its string form,
      e.g. "none" (the last token only, the method as published), "tail=64",
      "segments,first=4,spread,budget=0.1".
    exact_tail: the same as recompute="tail=N" (kept for existing callers).
    partial: a call with some slots that cannot be estimated still estimates the others
      and computes only those in context (default); False runs such calls fully dense;
      "prefix" plans as a backend that takes estimated KV for a prompt prefix only (the
      vLLM connector): every slot after the first computed one is computed too.
    defer_first_encoding: the first call of a request that carries a content computes it in
      context and encodes it after its first token (what `kvcomm serve` does), instead of
      encoding it before (kvcomm.plan.planner.PlanSettings).
    estimator: how estimated slots get their KV (kvcomm.plan.estimators): "anchors" (KVCOMM,
      default), "base" (moved bases, no offsets: CacheBlend / EPIC's start), "none" (prefix
      caching only), "fit" (anchor weights fitted to the content's base).
    head_share: a content longer than its slot's pool covers shares the first tokens the
      pool covers when they are at least this fraction of it, and the rest is computed
      (kvcomm.plan.planner.PlanSettings; None: the default, 0: off - the published rule).
    estimate_anchors: an estimate uses at most this many of its slot's candidates, the
      nearest to the content (None: the default, 0: all of them - the published rule).
    """

    def __init__(self, model, tokenizer, pool_config: PoolConfig | None = None, *,
                 pool: AnchorPool | None = None, lead_ins: dict | None = None,
                 recompute: RecomputePolicy | str | None = None, exact_tail: int | None = None,
                 partial: bool | str = DEFAULT_PARTIAL, defer_first_encoding: bool = False,
                 estimator: str | None = None, head_share: float | None = None,
                 estimate_anchors: int | None = None):
        if recompute is not None and exact_tail is not None:
            raise ValueError("give recompute or exact_tail, not both (exact_tail=N is recompute='tail=N')")
        self.spec = hf.enable(model)
        self.model = model
        self.tokenizer = tokenizer
        if pool is None:
            s = self.spec
            pool = AnchorPool(pool_config if pool_config is not None else
                              PoolConfig(layers=s.num_layers, kv_heads=s.kv_heads, head_dim=s.head_dim,
                                         min_anchors=DEFAULT_MIN_ANCHORS))
        self.planner = Planner(pool, self.spec, dataclasses.replace(
            _settings(partial, RecomputePolicy.parse(recompute)), defer_first_encoding=bool(defer_first_encoding),
            **({} if estimator is None else {"estimator": estimator}),
            **({} if head_share is None else {"head_share": head_share}),
            **({} if estimate_anchors is None else {"estimate_anchors": estimate_anchors})))
        if exact_tail is not None:
            self.exact_tail = exact_tail
        self.encoder = HeaderEncoder(model, tokenizer, self.spec, lead_ins)
        self.agents: dict[str, AgentState] = {}
        self.request: Session | None = None
        self._requests = 0
        self._paths: Counter = Counter()
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._is_blank = BlankTokens(tokenizer)
        # Optional static / CUDA-graph last-token step of the reuse path (use_static_step).
        self.static_step = None
        self._special_texts = special_texts(tokenizer)
        self._refusal: str | None = None
        self._chat = None   # kvcomm.engine.chat.ChatAdapter, made by the first chat() call

    @property
    def pool(self) -> AnchorPool:
        return self.planner.pool

    @pool.setter
    def pool(self, pool: AnchorPool) -> None:
        self.planner.pool = pool

    @property
    def settings(self) -> PlanSettings:
        """How this engine's calls decide (partial calls, recompute policy)."""
        return self.planner.settings

    @property
    def recompute(self) -> RecomputePolicy:
        return self.planner.settings.recompute

    @recompute.setter
    def recompute(self, policy: RecomputePolicy | str | None) -> None:
        self.planner.settings = dataclasses.replace(self.planner.settings, recompute=RecomputePolicy.parse(policy))

    @property
    def partial(self) -> bool | str:
        s = self.planner.settings
        return "prefix" if s.prefix_only and s.partial else s.partial

    @property
    def exact_tail(self) -> int:
        return self.recompute.tail

    @exact_tail.setter
    def exact_tail(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"exact_tail must be an int >= 1 (prompt tokens the reuse path runs), got {n!r}")
        self.recompute = dataclasses.replace(self.recompute, tail=n)

    def sibling(self, pool: AnchorPool | None = None, *, recompute=None,
                partial: bool | str | None = None, estimator: str | None = None,
                head_share: float | None = None, estimate_anchors: int | None = None) -> "KVCommEngine":
        """A new engine on the same model and tokenizer, with this engine's pool settings,
        lead-ins, recompute policy and partial setting unless given, but its own pool (a
        fresh one with the same config unless `pool` is given), agents, requests and reuse
        refusal. For running measurements side by side without one seeing another's anchors."""
        return KVCommEngine(self.model, self.tokenizer,
                            pool=pool if pool is not None else AnchorPool(self.pool.config),
                            lead_ins=self.encoder.lead_ins,
                            recompute=self.recompute if recompute is None else recompute,
                            partial=self.partial if partial is None else partial,
                            defer_first_encoding=self.settings.defer_first_encoding,
                            estimator=self.settings.estimator if estimator is None else estimator,
                            head_share=self.settings.head_share if head_share is None else head_share,
                            estimate_anchors=(self.settings.estimate_anchors if estimate_anchors is None
                                              else estimate_anchors))

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
        self.request = Session(index=self._requests)

    def next_round(self) -> None:
        """This round's replies become {agent_<id>_history} of the next round."""
        if self.request is None:
            self.new_request()
        self.request.next_round()

    # ------------------------------------------------------------------ plain chat messages

    def chat(self, messages: list, *, tools=None, session: str | None = None, tenant: str = "",
             mode: str = "kvcomm", **kw) -> AgentCall:
        """One OpenAI-style chat call: `messages` as an agent framework sends them (system,
        user, assistant and tool messages, other agents' replies inside them), nothing marked.
        Contents this engine has met before (replies it generated, texts earlier calls carried)
        are found and reused; the agent, slots and session are inferred (kvcomm.plan.chat;
        `session` and `tenant` override / scope them). A call with nothing known in it runs
        dense. Other keyword arguments as for call(); AgentCall.session says where it went."""
        if self._chat is None:
            from .chat import ChatAdapter
            self._chat = ChatAdapter(self)
        return self._chat.call(messages, tools=tools, session=session, tenant=tenant, mode=mode, **kw)

    def run_in_session(self, session: Session, st: AgentState, inputs: dict, *, mode: str = "kvcomm",
                       max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                       return_first_logits: bool = False, reply_ids: list[int] | None = None,
                       capture: bool = True, keep_cache: bool = False, reply_logits: int = 0) -> AgentCall:
        """call() for an agent state the caller made (an inferred chat template), in `session`."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if reply_ids is not None:
            max_new_tokens = len(reply_ids)
        saved, self.request = self.request, session
        try:
            with torch.inference_mode():
                return self._call(st, dict(inputs), mode, max_new_tokens, do_sample, float(temperature),
                                  return_first_logits, reply_ids, capture, keep_cache, reply_logits)
        finally:
            self.request = saved

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

        plan = None
        if mode == "dense":
            path, reason = "dense", "baseline"
            cache, logits = self._prefill(lay, capacity, 0)
            computed, s0_tokens = T, 0
            clock.lap("forward")
        else:
            plan = self.planner.plan(st, lay, self.request, max_new_tokens=max_new_tokens,
                                     encode=self.encoder.encode, refusal=self._refusal, laps=clock)
            cache = None
            if plan.uses_estimates:
                cache = self._reuse_buffer(capacity)
                self.planner.assemble(plan, cache.k, cache.v)
                clock.lap("estimate")
            if plan.uses_estimates and self.planner.wants_probe(plan):
                probe = self.planner.probe_positions(plan)
                self.planner.apply_probe(plan, probe_deviation(
                    self.model, cache, [lay.ids[p] for p in probe], probe, T, self.planner.probe_layer))
                clock.lap("probe")
            if plan.uses_estimates:   # still: anchors evicted since the decision can send it dense
                logits = self._run_positions(cache, lay, plan.positions)
            else:
                cache, logits = self._prefill(lay, capacity, plan.s0, st)
            path, reason = plan.path, plan.reason
            computed, s0_tokens = len(plan.positions), plan.s0
            clock.lap("forward")

        first = self._first_token(logits, do_sample, temperature)
        clock.lap("first_token")
        ttft_ms = (time.perf_counter() - start) * 1000.0

        if plan is not None and path != "reuse":
            self.planner.record(plan, cache.k, cache.v)
            clock.lap("record")
        tf_logits = None
        if reply_ids is not None:
            tokens, tf_logits = self._force_reply(cache, reply_ids, mode, reply_logits)
        else:
            tokens, tf_logits = self._decode(lay.ids, first, cache, max_new_tokens, do_sample, temperature,
                                             reply_logits)
        clock.lap("decode")
        lo, hi, _ = reply_span(tokens, self.eos_ids, self._is_blank)
        text = self.tokenizer.decode(tokens[lo:hi], skip_special_tokens=True)
        if (mode == "kvcomm" and capture and hi > lo and self._exact_range_ok(T + len(tokens)) and not self._refusal
                and self.planner.captures):
            self._capture(st, cache, T, tokens, lo, hi, text)
            clock.lap("capture")
        deferred_tokens = 0
        if plan is not None and plan.deferred:
            deferred_tokens = self.planner.encode_deferred(plan, self.request, self.encoder.encode)
            self.planner.settle(plan, self.request)   # the first carrier's deltas, now that the base exists
            clock.lap("encode_after")

        self._paths["baseline" if mode == "dense" else path] += 1
        timings = dict(clock.t)
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return AgentCall(agent=st.name, text=text, mode=mode, path=path, reason=reason, ttft_ms=ttft_ms,
                         timings=timings, first_token_id=int(first),
                         first_logits=logits.detach().cpu() if want_logits else None,
                         prompt_tokens=T, new_tokens=len(tokens),
                         slot_decisions=dict(plan.decisions) if plan else {},
                         token_ids=tokens, slot_gates=plan.gates if plan else {},
                         s0_tokens=s0_tokens, computed_tokens=computed,
                         encoded_tokens=(plan.encoded_tokens if plan else 0) + deferred_tokens,
                         recomputed=dict(plan.recomputed) if plan else {},
                         slot_anchors=dict(plan.anchors) if plan else {},
                         probed_tokens=plan.probed if plan else 0,
                         probe_fraction=(self.planner.probe_layer + 1) / self.spec.num_layers
                         if plan and plan.probed else 0.0,
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

    def _exact_range_ok(self, n: int) -> bool:
        return self.spec.exact_positions is None or n <= self.spec.exact_positions

    # ------------------------------------------------------------------ the dense prefill

    def _prefill(self, lay, capacity: int, prefix: int, st: AgentState | None = None):
        """Dense prefill after the first `prefix` tokens, copied from the agent's exact S0.
        (cache, logits)."""
        cache = KVBufferCache.for_spec(self.spec, capacity)
        if prefix:
            cache.k[:, :, :prefix].copy_(st.s0_k[:, :, :prefix])
            cache.v[:, :, :prefix].copy_(st.s0_v[:, :, :prefix])
            cache.set_length(prefix)
        return cache, forward(self.model, cache, lay.ids[prefix:])

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

    def _capture(self, st: AgentState, cache, T: int, tokens: list[int], lo: int, hi: int,
                 text: str) -> None:
        """The reply's KV, cut from this call's cache. Every generated token but the
        last was fed back; if the last one is content it still needs its KV
        (docs/method.md, "Details"), computed here with one more forward."""
        if cache.length < T + hi:
            forward(self.model, cache, tokens[cache.length - T:hi], want_logits=False)
        k, v = cache.span(T + lo, T + hi)
        self.planner.capture(self.request, st.name, tokens[lo:hi], k, v, T + lo, text=text)

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
