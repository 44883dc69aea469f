"""Soak: the demo graph over many requests with a small pool byte budget.

The `kvcomm demo` graph (fully connected 4 agents + decision on GSM8K, built by the
runtime's workload/topology/graph/GraphRunner, engine from the session's load_engine,
so the correctness gate and pool settings go through the same path as the CLI) runs
KVCOMM-mode requests back to back. After every request it samples:
  - RSS of this process (VmRSS from /proc/self/status),
  - pool bytes / anchors / evictions (pool bytes must never exceed the budget),
  - the request's agent calls and how many took the reuse path,
and any exception (counted, the soak goes on; exit status 1 if there was one).
Writes JSON (every sample, reuse rate per window, an RSS summary) and a PNG plot.

Dense runs and the decision agent's shadow call are skipped: this measures whether the
machinery holds memory and reuse steady under load, not accuracy (see `kvcomm demo`).

    python benchmarks/soak.py --requests 40                       # quick look
    flock /tmp/kvcomm-cpu.lock python benchmarks/soak.py --full \\
        --json results/soak/soak-cpu.json --plot docs/soak-rss.png      # 300 requests
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback

FULL_REQUESTS = 300
MIB = 2 ** 20


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS), in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def demo_runner(engine, n_agents: int = 4, max_new_tokens: int = 16):
    """The `kvcomm demo` graph (fully connected workers + decision on GSM8K) on `engine`."""
    from ..runtime.executor import GraphRunner
    from ..runtime.graph import build_graph
    from ..runtime.topology import make_topology
    from ..runtime.workloads import make_workload

    wl = make_workload("gsm8k", n_agents)
    graph = build_graph(make_topology("fully_connected", n_agents), wl.roles, wl.decision_role,
                        wl.question_label)
    return GraphRunner(graph, wl, engine, max_new_tokens=max_new_tokens, judge_shadow=False)


def _slope_per_100(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs, per 100 xs."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else 100.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def _growth(values: list, base_index: int) -> dict | None:
    """{after_warmup, final, max, growth_after_warmup} of a sampled count; None if not sampled."""
    if not values or any(v is None for v in values) or base_index < 0:
        return None
    base = values[base_index]
    return {"after_warmup": base, "final": values[-1], "max": max(values[base_index:]),
            "growth_after_warmup": values[-1] - base}


def run_soak(runner, problems: list, requests: int, *, window: int = 25, warm: int | None = None,
             log=print) -> dict:
    """Runs `requests` KVCOMM requests (problems cycled) and returns the report dict.

    warm: requests after which RSS is taken as the baseline (the pool fills to its budget
    and allocator arenas settle first); default one window."""
    from ..runtime.records import KVCOMM, MEASURE

    eng = runner.engines[KVCOMM]
    pool = eng.pool
    budget = int(pool.config.byte_budget)
    warm = window if warm is None else warm
    samples, errors = [], []
    gc.collect()
    rss0 = rss_bytes()
    t_start = time.perf_counter()
    for i in range(requests):
        problem = problems[i % len(problems)]
        t0 = time.perf_counter()
        calls = reused = partial = 0
        try:
            rec = runner.run(problem, KVCOMM, MEASURE)
            own = [c for c in rec.calls if not c.shadow]
            calls, reused = len(own), sum(1 for c in own if c.path == "reuse")
            partial = sum(1 for c in own if c.path == "partial")
            del rec, own
        except Exception as e:  # counted and reported; the soak goes on
            errors.append({"request": i + 1, "error": repr(e), "traceback": traceback.format_exc()[-4000:]})
        gc.collect()   # RSS then reflects what is still referenced, not what awaits collection
        samples.append({
            "request": i + 1, "elapsed_s": time.perf_counter() - t_start, "wall_s": time.perf_counter() - t0,
            "rss_mib": rss_bytes() / MIB, "py_objects": len(gc.get_objects()),
            "pool_bytes": int(pool.memory_bytes()),
            "anchors": int(pool.size()), "evictions": int(pool.evictions),
            "calls": calls, "reuse_calls": reused, "partial_calls": partial})
        if log and ((i + 1) % max(1, window) == 0 or i + 1 == requests):
            s = samples[-1]
            last = samples[-window:]
            rate = sum(x["reuse_calls"] for x in last) / max(1, sum(x["calls"] for x in last))
            log(f"[{i + 1}/{requests}] {s['elapsed_s']:.0f} s  RSS {s['rss_mib']:.0f} MiB  pool "
                f"{s['pool_bytes'] / MIB:.1f} MiB / {s['anchors']} anchors / {s['evictions']} evicted  "
                f"reuse {rate:.2f} (last {len(last)})  errors {len(errors)}")
    return summarize(samples, errors, budget=budget, window=window, warm=warm, rss_start_mib=rss0 / MIB)


def summarize(samples: list[dict], errors: list[dict], *, budget: int, window: int, warm: int,
              rss_start_mib: float) -> dict:
    windows = []
    for a in range(0, len(samples), window):
        chunk = samples[a:a + window]
        calls = sum(s["calls"] for s in chunk)
        reused = sum(s["reuse_calls"] for s in chunk)
        partial = sum(s.get("partial_calls", 0) for s in chunk)
        windows.append({"first": chunk[0]["request"], "last": chunk[-1]["request"], "calls": calls,
                        "reuse_calls": reused, "reuse_rate": reused / calls if calls else None,
                        "partial_calls": partial,
                        "reuse_or_partial_rate": (reused + partial) / calls if calls else None,
                        "rss_mib_end": chunk[-1]["rss_mib"]})
    rss = [s["rss_mib"] for s in samples]
    after = samples[min(warm, len(samples)) - 1:] if samples else []
    base = after[0]["rss_mib"] if after else None
    tail = samples[len(samples) // 2:]
    calls = sum(s["calls"] for s in samples)
    reused = sum(s["reuse_calls"] for s in samples)
    steady = [w["reuse_rate"] for w in windows[1:] if w["reuse_rate"] is not None]
    return {
        "requests": len(samples),
        "exceptions": len(errors),
        "errors": errors[:10],
        "calls": calls,
        "reuse_rate": reused / calls if calls else None,
        "reuse_rate_windows": windows,
        "reuse_rate_steady": {"min": min(steady) if steady else None, "max": max(steady) if steady else None,
                              "windows": len(steady)},
        "pool": {"byte_budget": budget, "max_bytes": max((s["pool_bytes"] for s in samples), default=0),
                 "final_bytes": samples[-1]["pool_bytes"] if samples else 0,
                 "final_anchors": samples[-1]["anchors"] if samples else 0,
                 "evictions": samples[-1]["evictions"] if samples else 0,
                 "over_budget_samples": sum(1 for s in samples if budget and s["pool_bytes"] > budget)},
        "rss_mib": {"start": rss_start_mib, "after_warmup": base, "warmup_requests": warm,
                    "final": rss[-1] if rss else None, "max": max(rss) if rss else None,
                    "growth_after_warmup": (rss[-1] - base) if rss and base is not None else None,
                    "max_after_warmup": max((s["rss_mib"] for s in after), default=None),
                    "slope_mib_per_100_requests_second_half":
                        _slope_per_100([s["request"] for s in tail], [s["rss_mib"] for s in tail])},
        # Objects the garbage collector tracks: a leak signal that malloc's behaviour cannot hide.
        "py_objects": _growth([s.get("py_objects") for s in samples], min(warm, len(samples)) - 1),
        "seconds": samples[-1]["elapsed_s"] if samples else 0.0,
        "samples": samples,
    }


def plot(report: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runtime.report import fit_title

    s = report["samples"]
    xs = [x["request"] for x in s]
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    ax.plot(xs, [x["rss_mib"] for x in s], color="#1f77b4", label="process RSS (MiB)")
    ax.plot(xs, [x["pool_bytes"] / MIB for x in s], color="#2ca02c", label="anchor pool (MiB)")
    budget = report["pool"]["byte_budget"]
    if budget:
        ax.axhline(budget / MIB, color="#2ca02c", ls=":", lw=1, label="pool byte budget")
    ax.set_xlabel("request")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    w = report["reuse_rate_windows"]
    ax2.step([x["last"] for x in w], [x["reuse_rate"] or 0.0 for x in w], where="pre", color="#d62728",
             label="reuse rate (per window)")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("reuse rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    fit_title(fig, ax, title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=40, help="requests to run (default 40)")
    p.add_argument("--full", action="store_true", help=f"the full soak: {FULL_REQUESTS} requests")
    p.add_argument("--budget-mib", type=float, default=64.0, help="pool byte budget in MiB (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="reply length of every agent (default 12)")
    p.add_argument("--window", type=int, default=25, help="requests per reuse-rate window (default 25)")
    p.add_argument("--warm", type=int, default=None,
                   help="requests before the RSS baseline, while the pool fills to its budget (default: "
                        "one window)")
    p.add_argument("--model", default=None, help="local model folder (default: embedded SmolLM2)")
    p.add_argument("--no-gate", action="store_true", help="skip the correctness gate")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write the RSS / pool / reuse plot here (PNG)")
    args = p.parse_args(argv)
    n = FULL_REQUESTS if args.full else args.requests

    import torch
    from ..runtime.datasets import load_task
    from .. import provenance
    from ..runtime.session import ExperimentConfig, apply_gate, gate_summary, load_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = int(args.budget_mib * MIB)
    cfg = ExperimentConfig(model=args.model, pool={"byte_budget": budget}, gate=not args.no_gate,
                           max_new_tokens=args.max_new_tokens)
    engine, name, detail, load_s = load_engine(cfg)
    print(f"{name} ({detail}) loaded in {load_s:.1f} s; pool budget {args.budget_mib:g} MiB")
    gate = apply_gate(engine, cfg)
    if gate is not None:
        print(f"{gate.reason} [{gate.source}, {gate.seconds:.1f} s]")
    problems = load_task("gsm8k")
    runner = demo_runner(engine, max_new_tokens=args.max_new_tokens)
    made = provenance.capture("python", "benchmarks/soak.py", argv=argv)   # before the soak's half hour
    report = run_soak(runner, problems, n, window=args.window, warm=args.warm)
    report = {
        "benchmark": "soak", "model": name, "device_detail": detail, "platform": platform.platform(),
        "torch": torch.__version__, **made.fields(),
        "graph": "kvcomm demo: gsm8k, fully connected 4 agents + decision, kvcomm mode only, no shadow",
        "max_new_tokens": args.max_new_tokens, "load_s": load_s,
        # glibc malloc tuning in the environment changes what RSS shows (docs/benchmarks.md, Soak)
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "gate": gate_summary(gate),
        **report}
    r = report["rss_mib"]
    print(f"done: {report['requests']} requests, {report['calls']} calls in {report['seconds']:.0f} s; "
          f"exceptions {report['exceptions']}; reuse rate {report['reuse_rate']:.3f} (windows after the first: "
          f"{report['reuse_rate_steady']['min']} .. {report['reuse_rate_steady']['max']}); pool max "
          f"{report['pool']['max_bytes'] / MIB:.1f} MiB of {args.budget_mib:g}; RSS start {r['start']:.0f}, after "
          f"warm-up {r['after_warmup']:.0f}, final {r['final']:.0f}, max {r['max']:.0f} MiB, slope "
          f"{r['slope_mib_per_100_requests_second_half'] or 0.0:.2f} MiB/100 requests (second half)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot, f"soak: {n} demo requests, {name}, pool budget {args.budget_mib:g} MiB")
        print(f"wrote {args.plot}")
    return 1 if report["exceptions"] else 0


if __name__ == "__main__":
    sys.exit(main())
