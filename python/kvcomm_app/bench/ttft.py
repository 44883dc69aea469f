"""Time to first token per agent, dense prefill vs KVCOMM, measured in the same run.

One request = the setting's agents called in order (agent i reads the input and the
replies of agents 1..i-1), once with mode="dense" and once with mode="kvcomm", on the
same engine and the same texts. Dense runs first in each request so KVCOMM never
benefits from a cache the dense run left warmer. TTFT is AgentCall.ttft_ms: from the
call's start to its first token, every cost counted (rendering and tokenizing the
prompt, encoding inputs, pool decisions, offset estimation, the forward, the first
token); KVCOMM calls that fall back to dense are counted as they are.

Replies are forced, not generated: every agent's reply is a fixed synthetic text of
exactly `output` tokens. The first token is computed and timed as usual; then the
engine takes the forced reply instead of decoding, feeds it through the model in one
forward (kvcomm mode) and captures its KV exactly as it captures a generated reply.
The last agent's reply is read by nobody, so it stops after its first token.
`warmup` requests fill the anchor pools (a slot shares once it has min_anchors anchors) and
warm the kernels; they are reported apart.

Two baselines per request, on the same texts: dense prefill of the whole prompt, and dense
prefill after the agent's exact prefix S0 taken from a cache (mode "prefix": what prefix
caching gives any server, KVCOMM or not; an engine with estimator 'none'). The headline
speedup is against the second. A KVCOMM reply's capture (cutting its KV and deciding its
slot) runs after its producer's first token and before its first reader's call: it is
charged to the first reader (agent i+1), as the input's encoding is charged to agent 1.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .setting import SettingBuilder, TTFTSetting

DENSE, KVCOMM, PREFIX = "dense", "kvcomm", "prefix"
WARMUP, MEASURE = "warmup", "measure"
STEPS = ("auto", "eager", "static", "graph")
TIMING_KEYS = ("encode", "decide", "estimate", "forward", "first_token")
SHARES = ("entropy", "always")
# share="always": the entropy test H <= gamma*log2(N) holds for every distribution
# once gamma >= 1 (H never exceeds log2 N); 2 leaves room for float rounding.
ALWAYS_SHARE_GAMMA = 2.0


@dataclass
class Sample:
    request: int
    phase: str
    mode: str
    agent: int
    name: str
    ttft_ms: float
    path: str
    reason: str
    prompt_tokens: int
    timings: dict = field(default_factory=dict)
    reply_captured: bool | None = None   # kvcomm: the forced reply is now the slot's captured base


def build_engine(model, tokenizer, builder: SettingBuilder, *, gamma: float | None = None,
                 capacity: int | None = None, step: str = "auto", step_capacity: int | None = None,
                 recompute: str = "none", min_anchors: int | None = None, partial: bool = True,
                 pool_path: str | None = None, pool_settings: dict | None = None, estimator: str = "anchors",
                 head_share: float | None = None, estimate_anchors: int | None = None):
    """(KVCommEngine with the setting's agents, step used). The reuse path's last-token
    step: auto = CUDA graph on CUDA, eager otherwise; static = the static buffer without
    capture (CPU-testable); graph = static + CUDA graph (CUDA only). The static step
    runs one token: a call that recomputes more goes through the scattered forward.
    pool_path: a saved pool to start from (when the file exists). pool_settings: further
    PoolConfig fields (storage, byte_budget)."""
    import kvcomm
    from kvcomm.engine import KVCommEngine

    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    spec = kvcomm.hf.inspect_model(model)
    pool = dict(layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim)
    if gamma is not None:
        pool["gamma"] = gamma
    if capacity is not None:
        pool["capacity"] = capacity
    if min_anchors is not None:
        pool["min_anchors"] = min_anchors
    pool.update(pool_settings or {})
    engine = KVCommEngine(model, tokenizer, pool_config=kvcomm.PoolConfig(**pool), recompute=recompute,
                          partial=partial, estimator=estimator, head_share=head_share,
                          estimate_anchors=estimate_anchors)
    if pool_path and os.path.exists(pool_path):
        engine.pool.load(pool_path)
    for a in builder.agents:
        engine.add_agent(a.name, a.system_prompt, a.template)
    on_cuda = spec.device.type == "cuda"
    if step == "auto":
        step = "graph" if on_cuda else "eager"
    if step == "graph" and not on_cuda:
        raise ValueError("--step graph needs a CUDA device (CUDA graphs)")
    if step in ("static", "graph"):
        engine.use_static_step(step_capacity or 8192, capture=(step == "graph"))
    return engine, step


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def prefix_engine(engine, builder: SettingBuilder):
    """The prefix-caching baseline: a sibling engine that reuses only the agent's exact S0."""
    eng = engine.sibling(estimator="none")
    for a in builder.agents:
        eng.add_agent(a.name, a.system_prompt, a.template)
    return eng


def measure(engine, builder: SettingBuilder, *, requests: int, warmup: int, log=None,
            prefix=None) -> list[Sample]:
    """Runs warmup + requests requests in every mode (dense, prefix when `prefix` is an
    engine for it, kvcomm); one Sample per agent call. Warm-up requests after the first run
    KVCOMM only: they fill its pools, and the baselines' kernels are warm after one."""
    n = builder.setting.agents
    device = engine.spec.device
    samples: list[Sample] = []
    t_start = time.perf_counter()
    modes = (DENSE, PREFIX, KVCOMM) if prefix is not None else (DENSE, KVCOMM)
    for r in range(warmup + requests):
        phase = WARMUP if r < warmup else MEASURE
        texts = builder.request(r)
        for mode in modes if phase == MEASURE or r == 0 else (KVCOMM,):
            eng = prefix if mode == PREFIX else engine
            eng.new_request()
            for a in builder.agents:
                kwargs = ({"max_new_tokens": 1} if a.index == n or mode == PREFIX else
                          {"reply_ids": texts.reply_ids[a.index - 1]})
                _sync(device)   # nothing queued by an earlier call lands in this call's clock
                call = eng.call(a.name, texts.inputs_for(a.index), mode=DENSE if mode == DENSE else KVCOMM,
                                **kwargs)
                captured = None
                if mode == KVCOMM and a.index < n:
                    rep = engine.request.current.get(a.name)
                    captured = rep is not None and list(rep.ids) == list(texts.reply_ids[a.index - 1])
                samples.append(Sample(r, phase, mode, a.index, a.name, float(call.ttft_ms), call.path,
                                      call.reason, int(call.prompt_tokens),
                                      {k: float(v) for k, v in call.timings.items()}, captured))
        if log is not None:
            done = [s for s in samples if s.request == r and s.mode == KVCOMM]
            reuse = sum(s.path == "reuse" for s in done)
            last = {s.mode: s.ttft_ms for s in samples if s.request == r and s.agent == n}
            log(f"request {r + 1}/{warmup + requests} ({phase}): last agent dense {last[DENSE]:.1f} ms, "
                f"kvcomm {last[KVCOMM]:.1f} ms; reuse {reuse}/{len(done)}; "
                f"{time.perf_counter() - t_start:.0f} s so far")
    return samples


def _median(xs):
    return statistics.median(xs) if xs else None


def _ratio(a, b):
    return None if a is None or not b else a / b


def charged(samples: list[Sample]) -> dict:
    """id(sample) -> a KVCOMM call's TTFT plus the capture of the reply it is the first to
    read (agent i reads agent i-1's reply first), as charged_ttft does for the eval graphs."""
    capture = {(s.request, s.agent): s.timings.get("capture", 0.0) for s in samples if s.mode == KVCOMM}
    return {id(s): s.ttft_ms + capture.get((s.request, s.agent - 1), 0.0) for s in samples if s.mode == KVCOMM}


def summarize(samples: list[Sample], setting: TTFTSetting, token_rows: list[dict]) -> dict:
    """Per agent medians over the measured requests, and the reuse rates. `kvcomm_ms` has the
    captures charged; `speedup` is against the prefix-cached baseline when it ran, else dense."""
    meas = [s for s in samples if s.phase == MEASURE]
    cost = charged(samples)
    agents = []
    for row in token_rows:
        i = row["agent"]
        dense = [s for s in meas if s.agent == i and s.mode == DENSE]
        pre = [s for s in meas if s.agent == i and s.mode == PREFIX]
        kv = [s for s in meas if s.agent == i and s.mode == KVCOMM]
        d = _median([s.ttft_ms for s in dense])
        p = _median([s.ttft_ms for s in pre])
        k = _median([cost[id(s)] for s in kv])
        base = p if p is not None else d
        reused = [s for s in kv if s.path == "reuse"]
        reuse_ms = _median([cost[id(s)] for s in reused])
        agents.append({
            "agent": i, "name": row["name"],
            "tokens": row["tokens"], "nominal_tokens": row["nominal_tokens"],
            "dense_ms": d, "prefix_ms": p, "kvcomm_ms": k, "speedup": _ratio(base, k),
            "baseline": "prefix" if p is not None else "dense",
            "speedup_vs_dense": _ratio(d, k), "speedup_vs_prefix": _ratio(p, k),
            "kvcomm_uncharged_ms": _median([s.ttft_ms for s in kv]),
            "reuse_rate": _ratio(len(reused), len(kv)),
            "kvcomm_reuse_only_ms": reuse_ms,
            "speedup_reuse_only": _ratio(base, reuse_ms),
            "speedup_reuse_only_vs_dense": _ratio(d, reuse_ms),
            "kvcomm_breakdown_ms": {key: _median([s.timings.get(key, 0.0) for s in kv])
                                    for key in TIMING_KEYS + ("capture",)},
            "dense_ms_all": [round(s.ttft_ms, 3) for s in dense],
            "prefix_ms_all": [round(s.ttft_ms, 3) for s in pre],
            "kvcomm_ms_all": [round(cost[id(s)], 3) for s in kv],
            "kvcomm_paths": [s.path for s in kv],
        })
    kv_all = [s for s in meas if s.mode == KVCOMM]
    warm = [s for s in samples if s.phase == WARMUP and s.mode == KVCOMM]
    dense_reasons: dict[str, int] = {}
    for s in kv_all:
        if s.path != "reuse":
            dense_reasons[s.reason] = dense_reasons.get(s.reason, 0) + 1
    captured = [s.reply_captured for s in samples if s.reply_captured is not None]
    return {
        "agents": agents,
        "reuse_rate": _ratio(sum(s.path == "reuse" for s in kv_all), len(kv_all)),
        "warmup_reuse_rate": _ratio(sum(s.path == "reuse" for s in warm), len(warm)),
        "kvcomm_dense_reasons": dense_reasons,
        "replies_captured": _ratio(sum(captured), len(captured)),
        "last_agent": agents[-1] if agents else None,
    }


def pool_gamma(share: str, gamma: float | None) -> float | None:
    """The pool's gamma for a share policy. "entropy": the share decision's entropy
    threshold decides, as in use (gamma as given, default 0.3). "always": every slot with
    at least two candidate anchors shares, so every call after the warm-up takes the
    reuse path. That is for timing the reuse path where the decision carries no
    information (random weights, random filler texts); the decision itself still runs
    and is timed."""
    if share not in SHARES:
        raise ValueError(f"share must be one of {SHARES}, got {share!r}")
    if share == "always":
        if gamma is not None:
            raise ValueError("share 'always' sets the pool's gamma itself; do not pass a gamma with it")
        return ALWAYS_SHARE_GAMMA
    return gamma


def result_stem(device_tag: str, *, share: str = "entropy", step: str = "auto", scaling: str | None = None,
                storage: str = "model") -> str:
    """results/ttft/ttft-<device>, then what sets this run apart from the default one, so
    runs of one session that differ in these do not overwrite each other."""
    stem = f"results/ttft/ttft-{device_tag}"
    if share != "entropy":
        stem += f"-share-{share}"
    if step != "auto":
        stem += f"-step-{step}"
    if storage != "model":
        stem += f"-anchors-{storage}"
    return stem + (f"-scaling-{scaling}" if scaling else "")


def run_setting(model, tokenizer, setting: TTFTSetting, *, requests: int, warmup: int, seed: int = 0,
                gamma: float | None = None, capacity: int | None = None, step: str = "auto",
                recompute: str = "none", min_anchors: int | None = None, partial: bool = True,
                share: str = "entropy", pool_path: str | None = None, log=None,
                pool_settings: dict | None = None, prefix_baseline: bool = True, estimator: str = "anchors",
                head_share: float | None = None, estimate_anchors: int | None = None) -> dict:
    """Builds the prompts and the engine, measures, summarises. The engine is fresh
    (empty pool) for every call of this function. `share`: see pool_gamma. prefix_baseline:
    also time dense prefill after the cached exact S0 (the headline's baseline)."""
    gamma = pool_gamma(share, gamma)
    builder = SettingBuilder(tokenizer, setting, seed=seed)
    token_rows = builder.check(builder.request(0))
    max_tokens = max(r["tokens"] for r in token_rows)
    limit = int(model.config.max_position_embeddings)
    if max_tokens + setting.output + 1 > limit:
        raise ValueError(f"TTFT setting: the last agent's prompt ({max_tokens} tokens) plus its reply "
                         f"({setting.output}) exceeds the model's {limit} positions; use smaller sizes")
    engine, step = build_engine(model, tokenizer, builder, gamma=gamma, capacity=capacity, step=step,
                                step_capacity=max_tokens + setting.output + 2, recompute=recompute,
                                min_anchors=min_anchors, partial=partial, pool_path=pool_path,
                                pool_settings=pool_settings, estimator=estimator, head_share=head_share,
                                estimate_anchors=estimate_anchors)
    t0 = time.perf_counter()
    samples = measure(engine, builder, requests=requests, warmup=warmup, log=log,
                      prefix=prefix_engine(engine, builder) if prefix_baseline else None)
    if pool_path:
        engine.pool.save(pool_path)
    out = summarize(samples, setting, token_rows)
    stats = engine.stats()
    out.update({
        "setting": setting.as_dict(), "requests": requests, "warmup": warmup, "seed": seed,
        "recompute": engine.recompute.describe(), "partial": partial, "estimator": estimator,
        "min_anchors": engine.pool.config.min_anchors, "storage": engine.pool.config.storage,
        "byte_budget": engine.pool.config.byte_budget, "share": share,
        "one_token_step": step if engine.static_step is None else f"{step}: {engine.static_step.describe()}",
        "pool": {"gamma": engine.pool.config.gamma, "anchors": stats.get("anchors"), "bytes": stats.get("bytes"),
                 "evictions": stats.get("evictions"), "loaded_from": pool_path if pool_path and
                 os.path.exists(pool_path) else None},
        "run_s": time.perf_counter() - t0,
        "samples": [asdict(s) for s in samples],
    })
    return out


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- scaling runs

def scaling_agents(model, tokenizer, base: TTFTSetting, counts: list[int], **kw) -> dict:
    """TTFT vs agent count. Agent i's prompt and work do not depend on how many agents
    follow it (setting.py), so one run with max(counts) agents holds every smaller
    system: the N-agent system is its first N agents."""
    top = max(counts)
    run = run_setting(model, tokenizer, TTFTSetting(top, base.prefix, base.input, base.output), **kw)
    rows = []
    for n in sorted(counts):
        ag = run["agents"][:n]
        rows.append(_scaling_row({"agents": n}, ag))
    return {"scaling": "agents", "values": sorted(counts), "rows": rows, "runs": [_strip(run)]}


def scaling_prefix(model, tokenizer, base: TTFTSetting, prefixes: list[int], **kw) -> dict:
    """TTFT vs prefix length: one run (fresh engine and pool) per prefix."""
    rows, runs = [], []
    for p in sorted(prefixes):
        run = run_setting(model, tokenizer, TTFTSetting(base.agents, p, base.input, base.output), **kw)
        rows.append(_scaling_row({"prefix": p}, run["agents"]))
        runs.append(_strip(run))
    return {"scaling": "prefix", "values": sorted(prefixes), "rows": rows, "runs": runs}


def _scaling_row(key: dict, agents: list[dict]) -> dict:
    last = agents[-1]
    dense = [a["dense_ms"] for a in agents if a["dense_ms"] is not None]
    kv = [a["kvcomm_ms"] for a in agents if a["kvcomm_ms"] is not None]
    rates = [a["reuse_rate"] for a in agents if a["reuse_rate"] is not None]
    return dict(key, last_agent_tokens=last["tokens"], last_agent_dense_ms=last["dense_ms"],
                last_agent_prefix_ms=last.get("prefix_ms"), baseline=last.get("baseline", "dense"),
                last_agent_kvcomm_ms=last["kvcomm_ms"], last_agent_speedup=last["speedup"],
                last_agent_reuse_rate=last["reuse_rate"],
                last_agent_reuse_only_ms=last["kvcomm_reuse_only_ms"],
                last_agent_speedup_reuse_only=_ratio(last["dense_ms"], last["kvcomm_reuse_only_ms"]),
                mean_dense_ms=statistics.fmean(dense) if dense else None,
                mean_kvcomm_ms=statistics.fmean(kv) if kv else None,
                mean_speedup=_ratio(statistics.fmean(dense) if dense else None,
                                    statistics.fmean(kv) if kv else None),
                reuse_rate=statistics.fmean(rates) if rates else None)


def _strip(run: dict) -> dict:
    """A run without its raw samples (the scaling JSON stays readable)."""
    return {k: v for k, v in run.items() if k != "samples"}
