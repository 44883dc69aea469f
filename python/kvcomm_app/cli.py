"""The `kvcomm` command.

  kvcomm demo   the main job: a fully connected 3-agent + decision graph on MMLU (a task
                the embedded model does), dense prefill vs KVCOMM on the same questions,
                with the embedded SmolLM2-135M-Instruct (or --model PATH), a table,
                optional JSON and plot.
  kvcomm eval   the same comparison on gsm8k / math500 / mmlu / humaneval with other
                graph sizes and topologies.
  kvcomm bench ttft
                the paper's TTFT setting (N fully connected agents, prefix/input/output
                tokens): dense vs KVCOMM time to first token per agent in one run, plus
                scaling runs over agent count and prefix length.
  kvcomm eval --sweep
                gamma x pool capacity grid on a task (dense once, KVCOMM per point).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from . import provenance, serve
from .cli_checks import STORAGES, UsageError, byte_size_arg, check_args, parse_variant


def _add_reuse_options(p: argparse.ArgumentParser) -> None:
    """How a KVCOMM call reuses: shared by demo, eval and bench ttft."""
    from kvcomm.plan.defaults import DEFAULT_ESTIMATE_ANCHORS, DEFAULT_MIN_ANCHORS
    from kvcomm.plan.recompute import DEFAULT_POLICY

    p.add_argument("--recompute", default=DEFAULT_POLICY, metavar="POLICY",
                   help="prompt tokens a KVCOMM call runs through the model besides the slots it cannot "
                        f"estimate (default '{DEFAULT_POLICY}'): 'none' (the last token only, as the paper) "
                        "or parts 'segments', 'first=K', 'spread', 'budget=F', 'tail=N', e.g. "
                        "'segments,first=4,spread,budget=0.1' (docs/method.md, 'Beyond the paper')")
    p.add_argument("--exact-tail", type=int, default=None, metavar="N",
                   help="the last N prompt tokens recomputed: the same as adding 'tail=N' to --recompute")
    p.add_argument("--min-anchors", type=int, default=DEFAULT_MIN_ANCHORS, metavar="M",
                   help="a content becomes an anchor while its slot has fewer than M long-enough anchors "
                        f"(default {DEFAULT_MIN_ANCHORS}; the published method's is 2)")
    p.add_argument("--no-partial", action="store_true",
                   help="a call with a slot that cannot be estimated runs fully dense, as the paper "
                        "(default: estimate the other slots, compute that one in context)")
    p.add_argument("--head-share", type=float, default=None, metavar="F",
                   help="a content longer than its slot's anchors shares the first tokens they cover when "
                        "those are at least this fraction of it (default 0.5; 0: off, the published rule)")
    p.add_argument("--estimate-anchors", type=int, default=None, metavar="K",
                   help="an estimate uses at most the K candidates nearest to the content "
                        f"(default {DEFAULT_ESTIMATE_ANCHORS}; 0: all of them, the published rule)")
    p.add_argument("--method", default=None, metavar="NAME[:VALUE]",
                   help="a named method instead of --recompute: kvcomm, prefix (prefix caching only), "
                        "cacheblend:R, epic:K, hybrid-deviation:R, hybrid-spread:R, fit, fit-deviation:R "
                        "(kvcomm.plan.methods; docs/quality.md compares them)")
    p.add_argument("--anchor-storage", default="model", choices=STORAGES,
                   help="how the pool holds anchors (default model: the model's dtype); int8 / fp8 store "
                        "per-channel-scaled values in about a quarter of fp32's bytes (docs/method.md "
                        "section 10)")
    p.add_argument("--pool-bytes", type=byte_size_arg, default=0, metavar="SIZE",
                   help="byte budget of the whole anchor pool, e.g. 48M or 2G; least-activated old anchors "
                        "are evicted to stay under it (default 0: unlimited)")


def _add_common(p: argparse.ArgumentParser, *, questions: int, warmup: int, max_new_tokens: int,
                paired: bool = False, threads: int | None = None) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a local transformers model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--questions", type=int, default=questions, metavar="N",
                   help=f"measured questions, each run dense and KVCOMM (default {questions})")
    p.add_argument("--warmup", type=int, default=warmup, metavar="K",
                   help=f"warm-up questions that fill the anchor pool first, reported apart (default {warmup}); "
                        "a slot shares only once it has --min-anchors anchors")
    p.add_argument("--offset", type=int, default=0, help="index of the first measured question")
    p.add_argument("--warmup-rule", default=None, choices=["longest", "cover"],
                   help="which held-out questions warm up: the longest (eval's default) or the shortest "
                        "that cover the measured ones (the demo's default: shorter prompts, a faster run)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="T",
                   help=f"reply length limit of every agent (default {max_new_tokens})")
    p.add_argument("--decision-dense", action="store_true",
                   help="keep the decision agent on the dense path in KVCOMM runs (identical decisions)")
    p.add_argument("--no-judge-shadow", action="store_true",
                   help="skip the dense re-run of the decision agent that measures judge consistency")
    p.add_argument("--gamma", type=float, default=None, help="the share decision's entropy threshold: a content shares when the entropy over its "
                        "candidate anchors is at most gamma*log2(candidates) (default 0.3)")
    p.add_argument("--capacity", type=int, default=None, help="anchors per slot (default 20)")
    _add_reuse_options(p)
    p.add_argument("--paired", action="store_true", default=paired,
                   help="also replay every dense run on a second KVCOMM engine with identical inputs and "
                        "the dense replies fed in (teacher forcing): first-token agreement and KL, and "
                        f"agreement over the dense reply's first tokens, per call{' (default on)' if paired else ''}")
    p.add_argument("--no-paired", dest="paired", action="store_false", help="no paired replay")
    p.add_argument("--paired-only", action="store_true",
                   help="with --paired: skip the free-running KVCOMM run (no KVCOMM accuracy or TTFT)")
    p.add_argument("--paired-variant", action="append", default=[], metavar="SETTINGS",
                   help="with --paired: replay the same dense run again with other settings, on an engine "
                        "and pool of their own, e.g. 'min_anchors=6' or 'recompute=segments,budget=0.1' or "
                        "'min_anchors=4 recompute=none partial=off' (PoolConfig fields, recompute, partial, head_share, "
                        "estimate_anchors; "
                        "repeatable; each gets its own fidelity table and --fidelity-json entry)")
    p.add_argument("--pool", metavar="PATH", default=None,
                   help="start from the anchor pool saved at PATH if it exists, save the pool there at the end")
    p.add_argument("--fidelity-json", metavar="PATH", default=None,
                   help="with --paired: add this run's fidelity entry to PATH (e.g. results/fidelity.json), "
                        "replacing an earlier run of the same task, graph, questions and settings")
    p.add_argument("--no-gate", action="store_true",
                   help="skip the correctness gate: a short reuse-vs-dense probe on the model (cached per "
                        "model) that keeps every call dense when reuse disagrees with dense")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=threads,
                   help="torch CPU threads (default: " + ("torch's choice" if threads is None else str(threads)) + ")")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of per-agent TTFT")
    p.add_argument("--records", metavar="PATH", help="write every call record as JSON lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcomm", description="KVCOMM: cross-context KV-cache reuse for multi-agent LLM pipelines "
        "(arXiv 2510.12872; not 'KVComm: Selective KV Sharing').")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="3 agents + decision on MMLU, dense vs KVCOMM (the main job)",
                          description="Runs a fully connected 3-agent + decision graph (knowledge expert, "
                          "reasoning expert, critic, final decision maker) over MMLU questions, once with "
                          "dense prefill and once with KVCOMM, and compares them.")
    # MMLU: the embedded model answers it (GSM8K: 0% in both modes, so the accuracy row said
    # nothing). Sized to finish in under 3 minutes on a 2-core CPU: 5 measured questions
    # after the 4 warm-up ones a slot needs before it can share (--min-anchors; the warm-up
    # takes held-out questions just long enough to cover the measured ones), replies of up
    # to 24 tokens (room for "... The answer is (X)"; `kvcomm eval` runs real sizes), one
    # torch thread (a 135M model gains little from two, and a busy machine's second core
    # slowed it several times over). Paired: every KVCOMM call is also replayed against its
    # dense twin, and timed against dense with the exact S0 cached (docs/quality.md).
    _add_common(demo, questions=5, warmup=4, max_new_tokens=24, paired=True, threads=1)

    ev = sub.add_parser("eval", help="dense vs KVCOMM on gsm8k, math500, mmlu or humaneval",
                        description="The demo's comparison on any task, graph size and topology.")
    ev.add_argument("--task", required=True, choices=["gsm8k", "math500", "mmlu", "humaneval", "squad"],
                    help="squad: reading comprehension, the passage a shared retrieved slot (EM and F1)")
    ev.add_argument("--agents", type=int, default=3, help="worker agents (default 3), plus the decision agent")
    ev.add_argument("--topology", default="fully_connected",
                    choices=["fully_connected", "chain", "star", "layered", "debate"])
    ev.add_argument("--rounds", type=int, default=2, help="debate rounds (default 2)")
    ev.add_argument("--layers", default=None, help="layer sizes for 'layered', e.g. 2,2")
    ev.add_argument("--mmlu-split", default="validation", choices=["dev", "validation", "test"])
    ev.add_argument("--sweep", action="store_true",
                    help="run a gamma x capacity grid (dense once, KVCOMM per point); writes "
                         "results/sweep/eval-<task>-<model>-sweep.json unless --json is given")
    ev.add_argument("--sweep-gammas", default="0,0.1,0.3,0.5,0.9", metavar="LIST",
                    help="gammas of the sweep (default 0,0.1,0.3,0.5,0.9)")
    ev.add_argument("--sweep-capacities", default="5,10,20", metavar="LIST",
                    help="pool capacities of the sweep (default 5,10,20)")
    _add_common(ev, questions=10, warmup=2, max_new_tokens=128)
    serve.add_backend_args(ev)

    bench = sub.add_parser("bench", help="benchmarks: `kvcomm bench ttft`, `kvcomm bench chat`",
                           description="Benchmarks. `kvcomm bench ttft --help` for the TTFT one, `kvcomm bench "
                           "chat --help` for framework traffic against kvcomm serve.")
    bsub = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    _add_bench_ttft(bsub)
    bsub.add_parser("chat", add_help=False, help="recorded framework traffic through kvcomm serve, each call "
                    "paired with plain vLLM (`kvcomm bench chat --help` for the options)")
    serve.add_serve_parser(sub)
    return parser


def _add_bench_ttft(bsub) -> None:
    t = bsub.add_parser(
        "ttft", help="dense vs KVCOMM time to first token in the paper's multi-agent setting",
        description="The paper's TTFT setting: N fully connected agents; agent i reads a prefix of P "
        "tokens, the shared input of I tokens and the O-token replies of agents 1..i-1. Replies are "
        "fixed synthetic texts of exactly O tokens (the first token is computed and timed; the reply is "
        "then fed through the model and captured like a generated one). Per agent: median TTFT of dense "
        "prefill and of KVCOMM over the measured requests, in the same run, every cost counted; reuse "
        "rate. Writes results/ttft/ttft-<device>.json and .png (or -scaling-<what> with --scaling).")
    t.add_argument("--agents", type=int, default=5, help="agents (default 5)")
    t.add_argument("--prefix", type=int, default=512, help="prefix tokens per agent (default 512)")
    t.add_argument("--input", type=int, default=1024, help="shared input tokens (default 1024)")
    t.add_argument("--output", type=int, default=512, help="tokens of every agent's reply (default 512)")
    t.add_argument("--requests", type=int, default=10, help="measured requests (default 10)")
    t.add_argument("--warmup", type=int, default=None,
                   help="warm-up requests that fill the pools first, reported apart (default: --min-anchors "
                        "+ 1, since a slot shares once it has that many anchors)")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    t.add_argument("--model", default=None,
                   help="smollm2 (CPU default), llama-3.1-8b-random (CUDA default: Llama-3.1-8B shapes, "
                        "random weights), tiny-random, or a local model folder")
    t.add_argument("--step", default="auto", choices=["auto", "eager", "static", "graph"],
                   help="the reuse path's last-token forward: auto = CUDA graph on CUDA, eager on CPU")
    t.add_argument("--gamma", type=float, default=None, help="the share decision's entropy threshold (default 0.3)")
    t.add_argument("--share", choices=["entropy", "always"], default="entropy",
                   help="entropy (default): the share decision's entropy threshold decides, as in use; "
                        "always: every slot with two candidate anchors shares, so every call after warm-up "
                        "takes the reuse path (for timing it where the decision means nothing: random "
                        "weights, filler texts; the decision still runs and is timed)")
    t.add_argument("--capacity", type=int, default=None, help="anchors per slot (default 20)")
    t.add_argument("--pool", metavar="PATH", default=None,
                   help="start from the anchor pool saved at PATH if it exists, save the pool there at the end")
    _add_reuse_options(t)
    t.add_argument("--scaling", choices=["agents", "prefix"], default=None,
                   help="TTFT vs agent count (one run of the largest count: its first N agents are the "
                        "N-agent system) or vs prefix length (one run per prefix)")
    t.add_argument("--values", default=None, metavar="LIST",
                   help="scaling values (default agents 2,3,4,5,6,7,8; prefix 64,128,256,512,1024)")
    t.add_argument("--seed", type=int, default=0, help="seed of the synthetic texts")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    serve.add_backend_args(t)
    t.add_argument("--json", metavar="PATH",
                   help="JSON path (default results/ttft/ttft-<device>[-share-always][-step-<step>]"
                        "[-scaling-<what>].json)")
    t.add_argument("--plot", metavar="PATH", help="PNG path (default: the JSON path with .png)")
    t.add_argument("--no-write", action="store_true", help="print only; write no JSON or PNG")
    t.add_argument("--no-progress", action="store_true", help="no per-request progress lines")


def _storage_settings(args) -> dict:
    """PoolConfig fields of --anchor-storage and --pool-bytes, only where they differ from the
    defaults (so recorded configs of earlier runs read the same)."""
    out = {}
    if args.anchor_storage != "model":
        out["storage"] = args.anchor_storage
    if args.pool_bytes:
        out["byte_budget"] = args.pool_bytes
    return out


def _config(args, task: str, n_agents: int, topology: str, rounds: int = 2, layers=None,
            mmlu_split: str = "validation"):
    from .runtime.session import ExperimentConfig
    pool = {k: v for k, v in (("gamma", args.gamma), ("capacity", args.capacity),
                              ("min_anchors", args.min_anchors)) if v is not None}
    pool.update(_storage_settings(args))
    method = {}
    if getattr(args, "method", None):
        from kvcomm.plan.methods import method_settings
        method = dict(method_settings(args.method), method=args.method)
    return ExperimentConfig(
        task=task, n_agents=n_agents, topology=topology, rounds=rounds, layers=layers, **method,
        questions=args.questions, warmup=args.warmup, offset=args.offset,
        max_new_tokens=args.max_new_tokens, decision_dense=args.decision_dense,
        judge_shadow=not args.no_judge_shadow, model=args.model, device=args.device,
        dtype=args.dtype, pool=pool, progress=not args.no_progress, mmlu_split=mmlu_split,
        gate=not args.no_gate, **({} if method else {"recompute": args.recompute}), partial=not args.no_partial,
        head_share=args.head_share, estimate_anchors=args.estimate_anchors,
        **({"warmup_rule": args.warmup_rule} if getattr(args, "warmup_rule", None) else {}),
        paired=args.paired, free=not args.paired_only, pool_path=args.pool,
        variants=[(spec, parse_variant(spec)) for spec in getattr(args, "paired_variant", [])])


def _run_and_report(cfg, args, title: str, engine_factory=None) -> int:
    from .runtime import report
    from .runtime.records import write_records
    from .runtime.session import run_experiment

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    prov = _provenance(args)   # the code that runs: read before a run that may take an hour
    t0 = time.perf_counter()
    res = run_experiment(cfg, engine_factory=engine_factory)
    total_s = time.perf_counter() - t0
    print()
    print(report.format_table(res.summary, res.warmup_summary,
                              title=f"{title}: {res.model_name} on {res.device_detail}"))
    for v in res.variants:
        from .runtime.fidelity_report import format_fidelity
        if v.summary.get("fidelity"):
            c = v.config
            more = "".join(f" {k}={getattr(c, k)!r}" for k in ("estimator", "head_share", "estimate_anchors")
                           if getattr(c, k, None) is not None)
            print(f"\nvariant {c.pool} recompute={c.recompute!r} partial={c.partial}{more}:")
            print(format_fidelity(v.summary["fidelity"]))
    print(f"wall time: {total_s:.0f} s in all ({res.load_s:.0f} s loading, {res.run_s:.0f} s running "
          f"{cfg.warmup} warm-up + {cfg.questions} measured questions in both modes)")
    if args.json:
        doc = report.summary_json(res.summary, model=res.model_name, device=res.device,
                                  warmup=res.warmup_summary, extra={
                                      "device_detail": res.device_detail, "task": cfg.task,
                                      "topology": cfg.topology, "n_agents": cfg.n_agents,
                                      "max_new_tokens": cfg.max_new_tokens,
                                      "decision_dense": cfg.decision_dense,
                                      "first_token_agreement_reuse": res.summary["first_token_agreement_reuse"],
                                      "wall_s": total_s, "load_s": res.load_s, "run_s": res.run_s,
                                      "engine_stats": _plain(res.engine_stats),
                                      **prov.fields(), "config": asdict(cfg)})
        report.write_json(doc, args.json)
        print(f"wrote {args.json}")
    if getattr(args, "fidelity_json", None):
        from .runtime.fidelity_report import fidelity_entry, update_fidelity_file
        if not res.summary.get("fidelity"):
            print("kvcomm: --fidelity-json needs --paired (no paired calls were measured)", file=sys.stderr)
        else:
            for r in [res] + res.variants:
                update_fidelity_file(args.fidelity_json, fidelity_entry(r, command=prov.command, commit=prov.git_sha))
            print(f"wrote {args.fidelity_json} ({1 + len(res.variants)} entries)")
    if args.plot:
        report.plot_ttft(res.summary, args.plot, title=f"{title}: TTFT per agent ({res.model_name})")
        print(f"wrote {args.plot}")
    if args.records:
        write_records(res.records, args.records)
        print(f"wrote {args.records}")
    return 0


def _plain(d: dict) -> dict:
    try:
        json.dumps(d)
        return d
    except TypeError:
        from .runtime.records import jsonable
        return jsonable(d)


def cmd_demo(args, engine_factory=None) -> int:
    import dataclasses
    cfg = _config(args, "mmlu", 3, "fully_connected")
    if args.warmup_rule is None:
        cfg = dataclasses.replace(cfg, warmup_rule="cover")
    return _run_and_report(cfg, args, "kvcomm demo (MMLU, fully connected 3 agents + decision)",
                           engine_factory)


def cmd_eval(args, engine_factory=None, sweep_factory=None) -> int:
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    cfg = _config(args, args.task, args.agents, args.topology, args.rounds, layers, args.mmlu_split)
    if args.sweep:
        return cmd_sweep(args, cfg, sweep_factory)
    return _run_and_report(cfg, args, f"kvcomm eval ({args.task}, {args.topology}, "
                           f"{args.agents} agents + decision)", engine_factory)


def _model_tag(model: str | None) -> str:
    import os
    import re
    if model is None:
        return "smollm2-135m"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.normpath(model))).lower()


def cmd_sweep(args, cfg, sweep_factory=None) -> int:
    """`kvcomm eval --sweep`: sweep_factory(pool) -> engine (tests pass a scripted one)."""
    from .bench import sweep
    from .runtime import report

    if args.gamma is not None or args.capacity is not None:
        print("kvcomm: --gamma/--capacity set one point; with --sweep use --sweep-gammas/--sweep-capacities",
              file=sys.stderr)
        return 2
    try:
        points = sweep.grid(sweep.parse_list(args.sweep_gammas, float),
                            sweep.parse_list(args.sweep_capacities, int))
    except ValueError as e:
        print(f"kvcomm: {e}", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    info = {"model_name": "scripted", "device_detail": f"{args.device} (scripted)"} if sweep_factory else None
    prov = _provenance(args)
    path = args.json or f"results/sweep/eval-{cfg.task}-{_model_tag(cfg.model)}-sweep.json"

    def write(doc: dict) -> None:   # after the dense pass and every point: a cut-off run keeps its rows
        doc.update(prov.fields(), config=asdict(cfg))
        report.write_json(_plain(doc), path)

    doc = sweep.run_sweep(cfg, points, engine_factory=sweep_factory, info=info, on_progress=write)
    print()
    print(f"kvcomm eval --sweep: {cfg.task}, {cfg.topology}, {cfg.n_agents} agents + decision, "
          f"{cfg.questions} questions after {cfg.warmup} warm-up; {doc['model']} on {doc['device_detail']}")
    print(sweep.format_table(doc))
    print(f"wrote {path} (rewritten after every grid point)")
    return 0


def _provenance(args) -> provenance.Provenance:
    """The commit and command a results file of this invocation records (`args.argv`:
    what main() parsed, so a test's argument list is recorded rather than pytest's)."""
    return provenance.capture("kvcomm", argv=getattr(args, "argv", None))


def cmd_bench(args) -> int:
    if getattr(args, "benchmark", None) != "ttft":
        print("usage: kvcomm bench ttft|chat [options]   (kvcomm bench ttft --help, kvcomm bench chat --help)",
              file=sys.stderr)
        return 2
    if getattr(args, "backend", "hf") == "vllm":
        return serve.cmd_bench_ttft_vllm(args)
    return cmd_bench_ttft(args)


def cmd_bench_ttft(args) -> int:
    import torch

    from .bench import output, ttft
    from .bench.models import load_bench_model
    from .bench.setting import TTFTSetting
    from .runtime import report

    if args.requests < 10:
        print(f"kvcomm: note: {args.requests} measured requests (the benchmark's standard is at least 10)",
              file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    try:
        base = TTFTSetting(args.agents, args.prefix, args.input, args.output)
        ttft.pool_gamma(args.share, args.gamma)     # a conflicting --gamma fails before the model loads
        values = None
        if args.scaling:
            default = "2,3,4,5,6,7,8" if args.scaling == "agents" else "64,128,256,512,1024"
            from .bench.sweep import parse_list
            values = parse_list(args.values or default, int)
            if not values or min(values) < 1:
                raise ValueError(f"--values must be positive integers, got {args.values!r}")
    except ValueError as e:
        print(f"kvcomm: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, tok, model_name = load_bench_model(args.model, args.device, getattr(torch, dtype_name))
    load_s = time.perf_counter() - t0
    log = None if args.no_progress else ttft.stderr_log
    if args.warmup is None:
        args.warmup = args.min_anchors + 1
    method = {"recompute": args.recompute}
    if args.method:
        from kvcomm.plan.methods import method_settings
        method = method_settings(args.method)
    kw = dict(requests=args.requests, warmup=args.warmup, seed=args.seed, gamma=args.gamma,
              capacity=args.capacity, step=args.step, min_anchors=args.min_anchors, **method,
              partial=not args.no_partial, share=args.share, pool_path=args.pool, log=log,
              pool_settings=_storage_settings(args), head_share=args.head_share,
              estimate_anchors=args.estimate_anchors)
    tag = output.device_tag(args.device)
    head = {"benchmark": "ttft", "device": tag, "device_detail": provenance.device_detail(args.device, dtype_name),
            "model": model_name, "dtype": dtype_name, **_provenance(args).fields()}
    try:
        if args.scaling == "agents":     # the setting actually run: the largest count
            doc = dict(head, setting=dict(base.as_dict(), agents=max(values)),
                       **ttft.scaling_agents(model, tok, base, values, **kw))
        elif args.scaling == "prefix":
            doc = dict(head, setting=dict(base.as_dict(), prefix=sorted(values)),
                       **ttft.scaling_prefix(model, tok, base, values, **kw))
        else:
            doc = dict(head, **ttft.run_setting(model, tok, base, **kw))
    except ValueError as e:
        print(f"kvcomm: {e}", file=sys.stderr)
        return 2
    doc.update(load_s=load_s, wall_s=time.perf_counter() - t0, paper=output.PAPER, notes=TTFT_NOTES,
               correctness_gate="off (timing only; see kvcomm demo/eval for quality)")
    print()
    if args.scaling:
        print(f"kvcomm bench ttft --scaling {args.scaling}: {model_name} on {doc['device_detail']}; "
              f"{args.requests} measured requests after {args.warmup} warm-up per run")
        print(output.scaling_table(doc))
    else:
        print(output.console_summary(doc))
    print(f"wall time {doc['wall_s']:.0f} s ({load_s:.0f} s loading)")
    if not args.no_write:
        stem = ttft.result_stem(tag, share=args.share, step=args.step, scaling=args.scaling,
                                storage=args.anchor_storage)
        path = args.json or stem + ".json"
        report.write_json(_plain(doc), path)
        png = args.plot or (path[:-5] if path.endswith(".json") else path) + ".png"
        (output.plot_scaling if args.scaling else output.plot_agents)(doc, png)
        print(f"wrote {path} and {png}")
    return 0


TTFT_NOTES = (
    "TTFT = AgentCall.ttft_ms: from the call's start to its first token, every cost counted (prompt "
    "rendering and tokenization, input encoding, pool decisions, offset estimation, forward, first token). "
    "Median over the measured requests; dense and KVCOMM in the same run on the same texts, dense first in "
    "each request. Replies are forced: fixed synthetic texts of exactly `output` tokens; the first token is "
    "computed and timed, then the reply is fed through the model in one forward (KVCOMM mode) and captured "
    "like a generated reply. The last agent stops after its first token (nobody reads its reply).")


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:2] == ["bench", "chat"]:   # its own command line (kvcomm_app/bench/chat_paired.py)
        from .bench import chat_paired
        return chat_paired.main(given[2:])
    parser = build_parser()
    if given[:1] == ["serve"] and "--" in given:
        # everything after `--` is vLLM's, wherever the model folder and kvcomm's flags are
        cut = given.index("--")
        args = parser.parse_args(given[:cut])
        args.vllm_args = [*(args.vllm_args or []), *given[cut + 1:]]
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.argv = list(argv) if argv is not None else sys.argv[1:]
        check_args(args, _named_models(args))
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "eval":
            vllm = getattr(args, "backend", "hf") == "vllm"
            return cmd_eval(args, serve.vllm_engine_factory(args) if vllm else None)
        if args.command == "serve":
            return serve.cmd_serve(args)
        return cmd_bench(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"kvcomm: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .runtime.datasets import DataNotInstalled
        if isinstance(e, DataNotInstalled):
            print(f"kvcomm: {e}", file=sys.stderr)
            return 1
        raise


def _named_models(args) -> tuple[str, ...]:
    """The model names --model takes besides a folder: bench ttft's built-in ones."""
    if getattr(args, "benchmark", None) != "ttft":
        return ()
    from .bench.models import NAMED
    return NAMED


if __name__ == "__main__":
    sys.exit(main())
