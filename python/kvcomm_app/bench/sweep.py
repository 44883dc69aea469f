"""`kvcomm eval --sweep`: the share decision's entropy threshold (gamma) x pool capacity, on real tasks.

For one task, graph and question set:
- the dense run is done once (it never touches the pool, so it is the same for every
  grid point) and its records pair with every grid point's KVCOMM records;
- every grid point gets a fresh engine on the same loaded model, with its own empty
  pool built from (gamma, capacity), and runs the warm-up + measured questions in
  KVCOMM mode;
- metrics are the runtime's own (runtime/metrics.py): reuse rate, accuracy, answer
  agreement and judge consistency vs the shared dense run, first-token agreement,
  per-agent TTFT.
Engines are made by `engine_factory(pool: dict) -> engine`; by default the first one
comes from runtime.session.load_engine (the model loaded once, exactly as `kvcomm eval`
builds it) and later ones reuse its model and tokenizer.

A full grid at benchmark sizes runs for hours, so `on_progress(doc)` is handed the
result document after the dense pass and after every grid point (`complete` false
until the last): the CLI writes it each time, and a run that is cut off still leaves
every point it finished.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from .._fmt import pct as _pct

GAMMAS = (0.0, 0.1, 0.3, 0.5, 0.9)
CAPACITIES = (5, 10, 20)
DEFAULT_POINT = (0.3, 20)     # docs/method.md, "Deciding" defaults


def grid(gammas=GAMMAS, capacities=CAPACITIES) -> list[tuple[float, int]]:
    """Every (gamma, capacity), gamma-major, each once, in the given order."""
    out: list[tuple[float, int]] = []
    for g in gammas:
        for c in capacities:
            if c < 1:
                raise ValueError(f"sweep: capacity must be at least 1, got {c}")
            if not 0.0 <= g:
                raise ValueError(f"sweep: gamma must be >= 0, got {g}")
            if (float(g), int(c)) not in out:
                out.append((float(g), int(c)))
    return out


def parse_list(text: str, kind=float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None


def default_engine_factory(cfg, log=print) -> tuple[Callable[[dict], object], dict]:
    """(factory, info). The model is loaded once, through session.load_engine."""
    from ..runtime.session import load_engine

    state: dict = {}
    info: dict = {}

    def make(pool: dict):
        if "first" not in state:
            engine, name, detail, load_s = load_engine(replace(cfg, pool=dict(pool)))
            state["first"] = engine
            info.update(model_name=name, device_detail=detail, load_s=load_s)
            return engine
        import kvcomm
        first = state["first"]
        return type(first)(first.model, first.tokenizer, pool_config=kvcomm.PoolConfig(**pool))

    return make, info


def run_sweep(cfg, points: list[tuple[float, int]], *, engine_factory: Callable[[dict], object] | None = None,
              info: dict | None = None, log: Callable[[str], None] = print,
              on_progress: Callable[[dict], None] | None = None) -> dict:
    """Runs the dense pass once and one KVCOMM pass per (gamma, capacity)."""
    from ..runtime.compare import run_comparison
    from ..runtime.executor import GraphRunner
    from ..runtime.graph import build_graph
    from ..runtime.metrics import summarize
    from ..runtime.records import DENSE, KVCOMM, MEASURE, WARMUP
    from ..runtime.session import apply_gate, gate_summary, select_problems
    from ..runtime.topology import make_topology
    from ..runtime.workloads import make_workload

    if not points:
        raise ValueError("sweep: empty grid")
    if engine_factory is None:
        engine_factory, info = default_engine_factory(cfg, log)
    info = info if info is not None else {}
    measured, warm = select_problems(cfg)
    workload = make_workload(cfg.task, cfg.n_agents)
    topo = make_topology(cfg.topology, cfg.n_agents, rounds=cfg.rounds, layers=cfg.layers)
    graph = build_graph(topo, workload.roles, workload.decision_role, workload.question_label)

    def runner(engines):
        return GraphRunner(graph, workload, engines, max_new_tokens=cfg.max_new_tokens,
                           decision_max_new_tokens=cfg.decision_max_new_tokens,
                           decision_dense=cfg.decision_dense, judge_shadow=cfg.judge_shadow)

    base_pool = dict(cfg.pool)
    first = engine_factory(dict(base_pool, gamma=points[0][0], capacity=points[0][1]))
    log(f"sweep: {cfg.task}, {topo.name}, {cfg.n_agents} agents + decision; {len(warm)} warm-up + "
        f"{len(measured)} measured questions; dense once, then KVCOMM at {len(points)} grid points")
    t0 = time.perf_counter()
    first_runner = runner(first)      # a runner adds the agents to its engines once
    dense_records = run_comparison(first_runner, measured, warm, modes=(DENSE,), progress=cfg.progress,
                                   desc=f"{cfg.task} dense")
    dense_s = time.perf_counter() - t0
    dense_summary = summarize(dense_records, MEASURE)
    dense = {"accuracy": dense_summary["accuracy"]["dense"], "run_s": dense_s,
             "ttft_ms": {n: a["ttft_ms_dense"] for n, a in dense_summary["agents"].items()}}

    rows: list[dict] = []

    def document() -> dict:
        return _document(cfg, points, info, dense, rows, time.perf_counter() - t0)

    if on_progress is not None:
        on_progress(document())
    for k, (gamma, capacity) in enumerate(points):
        engine = first if k == 0 else engine_factory(dict(base_pool, gamma=gamma, capacity=capacity))
        gate = apply_gate(engine, cfg)    # the same correctness gate as eval (the pool's gamma is part of its key)
        t1 = time.perf_counter()
        kv_records = run_comparison(first_runner if k == 0 else runner(engine), measured, warm, modes=(KVCOMM,),
                                    progress=cfg.progress, desc=f"{cfg.task} gamma={gamma} V={capacity}")
        records = dense_records + kv_records
        summary = summarize(records, MEASURE)
        warm_summary = summarize(records, WARMUP)
        stats = _stats(engine, gate_summary(gate))
        rows.append(_row(gamma, capacity, summary, warm_summary, stats, time.perf_counter() - t1))
        r = rows[-1]
        log(f"  gamma {gamma:g}, capacity {capacity}: reuse {_pct(r['reuse_rate'])}, accuracy "
            f"{_pct(r['accuracy']['kvcomm'])} (dense {_pct(r['accuracy']['dense'])}), agreement "
            f"{_pct(r['answer_agreement'])}, judge consistency {_pct(r['judge_consistency'])}")
        if engine is not first:
            del engine
        if on_progress is not None:
            on_progress(document())
    return document()


def _document(cfg, points, info: dict, dense: dict, rows: list[dict], wall_s: float) -> dict:
    """The sweep's result so far: every finished grid point, `complete` once all are."""
    return {
        "sweep": {"gammas": sorted({g for g, _ in points}), "capacities": sorted({c for _, c in points}),
                  "points": len(points), "points_done": len(rows), "complete": len(rows) == len(points),
                  "dense_runs": 1,
                  "note": "dense run once and paired with every grid point; fresh pool per point"},
        "task": cfg.task, "topology": cfg.topology, "n_agents": cfg.n_agents, "questions": cfg.questions,
        "warmup": cfg.warmup, "offset": cfg.offset, "max_new_tokens": cfg.max_new_tokens,
        "decision_dense": cfg.decision_dense, "judge_shadow": cfg.judge_shadow,
        "model": info.get("model_name"), "device": cfg.device, "device_detail": info.get("device_detail"),
        "dense": dense,
        "grid": list(rows),
        "default_point": _default_row(rows),
        "wall_s": wall_s,
    }


# What must match for two sweeps' rows to share one table: the same questions, graph and
# model, so that their (deterministic) dense passes are the same run.
SAME_SETTING = ("task", "topology", "n_agents", "questions", "warmup", "offset", "max_new_tokens",
                "decision_dense", "judge_shadow", "model", "device")


def merge(docs: dict[str, dict]) -> dict:
    """One sweep document from several {path: doc} run on disjoint parts of a grid (e.g. two
    cores, each with its own dense pass). Refuses different settings, a dense accuracy that
    differs (the dense pass is deterministic, so a difference means the runs differ) and a
    grid point present twice."""
    if not docs:
        raise ValueError("merge: no sweeps given")
    paths = list(docs)
    first = docs[paths[0]]
    rows, seen = [], {}
    for path in paths:
        doc = docs[path]
        for key in SAME_SETTING:
            if doc.get(key) != first.get(key):
                raise ValueError(f"merge: {path} has {key}={doc.get(key)!r}, {paths[0]} has {first.get(key)!r}")
        if doc["dense"]["accuracy"] != first["dense"]["accuracy"]:
            raise ValueError(f"merge: dense accuracy {doc['dense']['accuracy']} in {path} vs "
                             f"{first['dense']['accuracy']} in {paths[0]}: not the same dense run")
        for r in doc["grid"]:
            point = (r["gamma"], r["capacity"])
            if point in seen:
                raise ValueError(f"merge: grid point gamma={point[0]:g} capacity={point[1]} "
                                 f"is in both {seen[point]} and {path}")
            seen[point] = path
            rows.append(r)
    rows.sort(key=lambda r: (r["gamma"], r["capacity"]))
    out = {k: first.get(k) for k in SAME_SETTING}
    out.update(
        sweep={"gammas": sorted({r["gamma"] for r in rows}), "capacities": sorted({r["capacity"] for r in rows}),
               "points": sum(d["sweep"]["points"] for d in docs.values()), "points_done": len(rows),
               "complete": all(d["sweep"].get("complete", True) for d in docs.values()),
               "dense_runs": len(docs),
               "note": "merged from sweeps over disjoint grid points; each ran its own (identical) dense pass"},
        device_detail=first.get("device_detail"),
        dense=first["dense"],
        grid=rows,
        default_point=_default_row(rows),
        sources=[{"path": p, "git_sha": d.get("git_sha"), "command": d.get("command"),
                  "points": d["sweep"]["points"], "points_done": len(d["grid"]),
                  "wall_s": d.get("wall_s")} for p, d in docs.items()],
    )
    return out


def _default_row(rows: list[dict]) -> dict | None:
    return next((r for r in rows if (r["gamma"], r["capacity"]) == DEFAULT_POINT), None)


def _stats(engine, gate: dict | None) -> dict:
    try:
        s = dict(engine.stats())
    except Exception:
        return {}
    out = {k: s.get(k) for k in ("anchors", "bytes", "evictions") if k in s}
    if hasattr(engine, "refuse_reuse"):
        out["gate"] = gate
    return out


def _row(gamma, capacity, summary, warm_summary, stats, run_s) -> dict:
    return {
        "gamma": gamma, "capacity": capacity,
        "reuse_rate": summary["reuse_rate"],
        "accuracy": dict(summary["accuracy"]),
        "answer_agreement": summary["answer_agreement"],
        "judge_consistency": summary["judge_consistency"],
        "first_token_agreement": summary["first_token_agreement"],
        "first_token_pairs": summary["first_token_pairs"],
        "first_token_agreement_reuse": summary["first_token_agreement_reuse"],
        "warmup_reuse_rate": warm_summary["reuse_rate"],
        "agents": {n: {"ttft_ms_dense": a["ttft_ms_dense"], "ttft_ms_kvcomm": a["ttft_ms_kvcomm"],
                       "speedup": a["speedup"], "reuse_rate": a["reuse_rate"]}
                   for n, a in summary["agents"].items()},
        "pool": stats,
        "run_s": run_s,
    }


def format_table(doc: dict) -> str:
    """Markdown table of the grid."""
    lines = ["| gamma | capacity | reuse | accuracy KVCOMM | accuracy dense | answer agreement | "
             "judge consistency | first-token agreement (reuse calls) | anchors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["grid"]:
        lines.append(f"| {r['gamma']:g} | {r['capacity']} | {_pct(r['reuse_rate'])} | "
                     f"{_pct(r['accuracy']['kvcomm'])} | {_pct(r['accuracy']['dense'])} | "
                     f"{_pct(r['answer_agreement'])} | {_pct(r['judge_consistency'])} | "
                     f"{_pct(r['first_token_agreement_reuse'])} | {r['pool'].get('anchors', '-')} |")
    return "\n".join(lines)
