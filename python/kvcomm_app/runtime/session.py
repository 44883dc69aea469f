"""One experiment end to end: load the model, build the engine and the graph, run dense
and KVCOMM over real questions, summarise. Shared by `kvcomm demo` and `kvcomm eval`."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import provenance
from .compare import run_comparison
from .datasets import load_task
from .executor import GraphRunner
from .graph import build_graph
from .metrics import summarize
from .paired import PairedReplay
from .records import DENSE, KVCOMM, MEASURE, WARMUP, QuestionRecord
from .topology import make_topology
from .workloads import make_workload

EMBEDDED_MODEL = "SmolLM2-135M-Instruct (embedded)"
WARMUP_POOL = 100   # warm-up questions come from the last 100 of the split


@dataclass
class ExperimentConfig:
    task: str = "gsm8k"
    n_agents: int = 4
    topology: str = "fully_connected"
    rounds: int = 2                     # debate only
    layers: list[int] | None = None     # layered only
    questions: int = 6
    warmup: int = 2
    offset: int = 0
    max_new_tokens: int = 96
    decision_max_new_tokens: int | None = None
    decision_dense: bool = False
    judge_shadow: bool = True
    model: str | None = None            # a local transformers folder; None = embedded SmolLM2
    device: str = "cpu"
    dtype: str = "float32"
    pool: dict = field(default_factory=dict)   # PoolConfig fields (gamma, capacity, ...)
    progress: bool = True
    mmlu_split: str = "validation"
    seed: int = 0
    gate: object = True                 # correctness gate before reuse (kvcomm.engine.gate): True
                                        # (its defaults), False, or a GateConfig
    recompute: str = "none"             # KVCommEngine(recompute=...): prompt tokens a KVCOMM call runs
    estimator: str = "anchors"          # KVCommEngine(estimator=...): how estimated slots get their KV
    method: str | None = None           # the named method (kvcomm.plan.methods) that set the two above
    prefix_baseline: bool = True        # paired: also time dense prefill after the cached exact S0
    warmup_rule: str = "longest"        # which held-out questions warm up: "longest", or "cover" (the
                                        # shortest that are at least as long as every measured one)
    partial: bool = True                # KVCommEngine(partial=...): estimate what can be, compute the rest
    head_share: float | None = None     # KVCommEngine(head_share=...); None: the engine's default
    estimate_anchors: int | None = None  # KVCommEngine(estimate_anchors=...); None: the engine's default
    paired: bool = False                # also replay each dense run teacher-forced (runtime/paired.py)
    paired_positions: int = 32          # reply positions compared per paired call
    free: bool = True                   # run KVCOMM free-running too (accuracy, end answers, TTFT)
    pool_path: str | None = None        # load the anchor pool from here if present; save it at the end
    variants: list = field(default_factory=list)   # [(label, overrides)]: more paired replays of the
                                        # same dense run, each with its own engine and pool; overrides
                                        # take PoolConfig fields, "recompute" and "partial"


@dataclass
class ExperimentResult:
    config: ExperimentConfig
    records: list[QuestionRecord]
    summary: dict
    warmup_summary: dict
    model_name: str
    device: str
    device_detail: str
    load_s: float
    run_s: float
    engine_stats: dict
    gate: dict | None = None            # the correctness gate's result (None: off or not supported)
    variants: list = field(default_factory=list)   # an ExperimentResult per paired variant


def select_problems(cfg: ExperimentConfig):
    """Measured questions from `offset` on; warm-up questions from the far end of the same
    split (the longest of its last WARMUP_POOL) so the two never overlap. MMLU is shuffled (seeded) first: its files are in
    subject order and the first questions would all be abstract algebra."""
    kwargs = {"split": cfg.mmlu_split} if cfg.task == "mmlu" else {}
    problems = load_task(cfg.task, **kwargs)
    if cfg.task == "mmlu":
        random.Random(cfg.seed).shuffle(problems)
    measured = problems[cfg.offset:cfg.offset + cfg.questions]
    # A slot can share only with anchors at least as long as the new content (docs/method.md, "Deciding"), so
    # the warm-up takes the longest questions of a held-out tail slice: anchors that
    # cover the lengths of the measured questions, like a pool that has seen traffic.
    held_out = problems[max(cfg.offset + cfg.questions, len(problems) - WARMUP_POOL):]
    size = lambda p: len(p.question) + len(p.extra.get("passage", ""))  # noqa: E731
    warm = sorted(held_out, key=size, reverse=True)[:max(cfg.warmup, 0)]
    if cfg.warmup_rule == "cover":
        # Anchors as long as the measured contents need, no longer: a short run (the demo)
        # does not pay for the split's longest passages.
        longest = max((size(p) for p in measured), default=0)
        covering = sorted((p for p in held_out if size(p) >= longest), key=size)[:max(cfg.warmup, 0)]
        if len(covering) == max(cfg.warmup, 0):
            warm = covering
    elif cfg.warmup_rule != "longest":
        raise ValueError(f"warmup_rule must be 'longest' or 'cover', got {cfg.warmup_rule!r}")
    if len(measured) < cfg.questions:
        raise ValueError(f"{cfg.task} has {len(problems)} questions; cannot take {cfg.questions} "
                         f"from offset {cfg.offset}")
    if {p.id for p in measured} & {p.id for p in warm}:
        raise ValueError("warm-up and measured questions overlap; ask for fewer questions")
    return measured, warm


def load_engine(cfg: ExperimentConfig):
    """(engine, model name, device detail, seconds). Imports torch and the engine here, so
    the rest of the runtime stays importable without them."""
    import torch
    from kvcomm.engine import KVCommEngine
    from kvcomm.models import load_model
    import kvcomm

    dtype = getattr(torch, cfg.dtype)
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model, dtype=dtype, device=cfg.device)
    pool_config = kvcomm.PoolConfig(**cfg.pool) if cfg.pool else None
    engine = KVCommEngine(model, tokenizer, pool_config=pool_config, recompute=cfg.recompute,
                          partial=cfg.partial, estimator=cfg.estimator, head_share=cfg.head_share,
                          estimate_anchors=cfg.estimate_anchors)
    load_s = time.perf_counter() - t0
    name = EMBEDDED_MODEL if cfg.model is None else os.path.basename(os.path.normpath(cfg.model))
    return engine, name, provenance.device_detail(cfg.device, cfg.dtype), load_s


def apply_gate(engine, cfg: ExperimentConfig):
    """Runs the correctness gate of `cfg` on `engine` (kvcomm.engine.gate.apply: the probe,
    once per model and cached; a refusal makes every KVCOMM call of the engine run dense).
    Returns the GateResult, or None when the gate is off or the engine is a stand-in
    without refuse_reuse (kvcomm_app.runtime.testing)."""
    if not cfg.gate or not hasattr(engine, "refuse_reuse"):
        return None
    from kvcomm.engine import gate
    return gate.apply(engine, gate.GateConfig() if cfg.gate is True else cfg.gate)


def gate_summary(res) -> dict | None:
    """A GateResult as the dict the result files carry (without per-probe details)."""
    return None if res is None else {k: v for k, v in res.to_dict().items() if k != "details"}


def run_experiment(cfg: ExperimentConfig, engine_factory: Callable | None = None,
                   log: Callable[[str], None] = print) -> ExperimentResult:
    """engine_factory(cfg) -> (engine, model name, device detail, load seconds); defaults to
    loading the model (tests pass a scripted engine)."""
    measured, warm = select_problems(cfg)
    workload = make_workload(cfg.task, cfg.n_agents)
    topo = make_topology(cfg.topology, cfg.n_agents, rounds=cfg.rounds, layers=cfg.layers)
    graph = build_graph(topo, workload.roles, workload.decision_role, workload.question_label)
    log(f"loading {'the embedded model' if cfg.model is None else cfg.model} on {cfg.device} ...")
    engine, model_name, detail, load_s = (engine_factory or load_engine)(cfg)
    log(f"model ready in {load_s:.1f} s: {model_name} ({detail})")
    res = apply_gate(engine, cfg)
    gate = gate_summary(res)
    if res is not None:
        how = f"probe {res.seconds:.1f} s" if res.source == "probe" else f"cached ({res.source})"
        log(f"{res.reason} [{how}]" + ("" if res.allowed else "; every KVCOMM call runs dense"))
    log(f"graph: {topo.name}, {len(graph.agents)} agents + decision "
        f"({', '.join(a.name for a in graph.all_agents)}), {topo.rounds} round(s); "
        f"{cfg.task}: {len(warm)} warm-up + {len(measured)} measured questions, each dense and KVCOMM")
    runner = GraphRunner(graph, workload, engine, max_new_tokens=cfg.max_new_tokens,
                         decision_max_new_tokens=cfg.decision_max_new_tokens,
                         decision_dense=cfg.decision_dense, judge_shadow=cfg.judge_shadow)
    paired = None
    if cfg.paired:
        if not hasattr(engine, "sibling"):
            raise ValueError("paired evaluation needs a KVCommEngine (teacher forcing, reply logits)")
        paired_engine = engine.sibling()
        if res is not None:
            paired_engine.refuse_reuse(engine.reuse_refusal)
        # The baseline a user runs without KVCOMM: dense prefill after the agent's cached exact S0.
        baseline = engine.sibling(estimator="none") if cfg.prefix_baseline else None
        paired = [PairedReplay(paired_engine, graph, workload, positions=cfg.paired_positions,
                               baseline=baseline)]
        for label, overrides in cfg.variants:
            variant_engine = variant_sibling(engine, cfg, overrides)
            if res is not None:
                variant_engine.refuse_reuse(engine.reuse_refusal)
            paired.append(PairedReplay(variant_engine, graph, workload, positions=cfg.paired_positions,
                                       label=label))
    elif cfg.variants:
        raise ValueError("paired variants replay the dense run teacher-forced: they need paired=True")
    # a remote engine (kvcomm.vllm.client.RemoteEngine) has no pool here: the server holds it
    pools = [e.pool for e in ([engine] if cfg.free else []) + [p.engine for p in paired or []]
             if getattr(e, "pool", None) is not None]
    loaded = load_pool(cfg.pool_path, pools, log)
    modes = (DENSE, KVCOMM) if cfg.free else (DENSE,)
    t0 = time.perf_counter()
    records = run_comparison(runner, measured, warm, modes=modes, progress=cfg.progress, desc=cfg.task,
                             paired=paired)
    run_s = time.perf_counter() - t0
    if cfg.pool_path and pools:
        pools[0].save(cfg.pool_path)
        log(f"anchor pool saved to {cfg.pool_path} ({pools[0].size()} anchors"
            f"{'; it started from the saved one' if loaded else ''})")
    stats = {}
    if hasattr(engine, "stats"):
        try:
            stats = dict(engine.stats())
        except Exception as e:  # stats are informative only
            stats = {"error": repr(e)}
        if hasattr(engine, "refuse_reuse"):
            stats["gate"] = gate
    own = [r for r in records if r.variant is None]
    result = ExperimentResult(cfg, own, summarize(own, MEASURE), summarize(own, WARMUP),
                              model_name, cfg.device, detail, load_s, run_s, stats, gate)
    for label, overrides in cfg.variants:
        # The variant's paired records beside the shared dense ones (its own result, as if
        # it had been run alone with those settings and paired_only).
        mine = [r for r in records if r.mode == DENSE or r.variant == label]
        vcfg = variant_config(cfg, overrides)
        result.variants.append(ExperimentResult(vcfg, mine, summarize(mine, MEASURE), summarize(mine, WARMUP),
                                                model_name, cfg.device, detail, load_s, run_s, {}, gate))
    return result


VARIANT_KEYS = ("recompute", "partial", "estimator", "method", "head_share", "estimate_anchors")


def variant_config(cfg: ExperimentConfig, overrides: dict) -> ExperimentConfig:
    """cfg with a paired variant's settings (no free-running run of its own)."""
    import dataclasses
    pool = {**cfg.pool, **{k: v for k, v in overrides.items() if k not in VARIANT_KEYS}}
    rest = {k: v for k, v in overrides.items() if k in VARIANT_KEYS}
    return dataclasses.replace(cfg, pool=pool, free=False, variants=[], **rest)


def variant_sibling(engine, cfg: ExperimentConfig, overrides: dict):
    """A sibling of `engine` with a fresh pool of the variant's PoolConfig and its recompute
    / partial settings."""
    vcfg = variant_config(cfg, overrides)
    pool = None
    if vcfg.pool and hasattr(engine, "spec"):
        import kvcomm
        s = engine.spec   # the model's shape, which the pool checks every KV against
        pool = kvcomm.AnchorPool(kvcomm.PoolConfig(**vcfg.pool, layers=s.num_layers, kv_heads=s.kv_heads,
                                                   head_dim=s.head_dim))
    return engine.sibling(pool, recompute=vcfg.recompute, partial=vcfg.partial, estimator=vcfg.estimator,
                          head_share=vcfg.head_share, estimate_anchors=vcfg.estimate_anchors)


def load_pool(path: str | None, pools: list, log: Callable[[str], None]) -> bool:
    """Loads a saved anchor pool into every pool of the run (each gets its own copy) when
    `path` names a file; a missing file is a cold start. True when one was loaded."""
    if not path or not os.path.exists(path):
        if path:
            log(f"no anchor pool at {path} yet: starting cold; it is saved there at the end")
        return False
    for pool in pools:
        pool.load(path)
    if pools:
        log(f"anchor pool loaded from {path}: {pools[0].size()} anchors in {len(pools[0].slots())} slots")
    return True
