"""The `kvcomm` command.

  kvcomm demo   the main job: a fully connected 4-agent + decision math graph on GSM8K,
                dense prefill vs KVCOMM on the same questions, with the embedded
                SmolLM2-135M-Instruct (or --model PATH), a table, optional JSON and plot.
  kvcomm eval   the same comparison on gsm8k / math500 / mmlu / humaneval with other
                graph sizes and topologies.
  kvcomm bench  the paper's TTFT setting: arrives with issue 6.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict


def _add_common(p: argparse.ArgumentParser, *, questions: int, warmup: int, max_new_tokens: int) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a local transformers model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--questions", type=int, default=questions, metavar="N",
                   help=f"measured questions, each run dense and KVCOMM (default {questions})")
    p.add_argument("--warmup", type=int, default=warmup, metavar="K",
                   help=f"warm-up questions that fill the anchor pool first, reported apart (default {warmup}); "
                        "a slot shares only once it has 2 anchors")
    p.add_argument("--offset", type=int, default=0, help="index of the first measured question")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="T",
                   help=f"reply length limit of every agent (default {max_new_tokens})")
    p.add_argument("--decision-dense", action="store_true",
                   help="keep the decision agent on the dense path in KVCOMM runs (identical decisions)")
    p.add_argument("--no-judge-shadow", action="store_true",
                   help="skip the dense re-run of the decision agent that measures judge consistency")
    p.add_argument("--gamma", type=float, default=None, help="entropy gate of the anchor pool (default 0.3)")
    p.add_argument("--capacity", type=int, default=None, help="anchors per slot (default 20)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of per-agent TTFT")
    p.add_argument("--records", metavar="PATH", help="write every call record as JSON lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcomm", description="KVCOMM: cross-context KV-cache reuse for multi-agent LLM pipelines "
        "(arXiv 2510.12872; not 'KVComm: Selective KV Sharing').")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="4 agents + decision on GSM8K, dense vs KVCOMM (the main job)",
                          description="Runs a fully connected 4-agent + decision math graph (solver, "
                          "analyst, programming expert, inspector) over GSM8K questions, once with "
                          "dense prefill and once with KVCOMM, and compares them.")
    _add_common(demo, questions=6, warmup=2, max_new_tokens=96)

    ev = sub.add_parser("eval", help="dense vs KVCOMM on gsm8k, math500, mmlu or humaneval",
                        description="The demo's comparison on any task, graph size and topology.")
    ev.add_argument("--task", required=True, choices=["gsm8k", "math500", "mmlu", "humaneval"])
    ev.add_argument("--agents", type=int, default=3, help="worker agents (default 3), plus the decision agent")
    ev.add_argument("--topology", default="fully_connected",
                    choices=["fully_connected", "chain", "star", "layered", "debate"])
    ev.add_argument("--rounds", type=int, default=2, help="debate rounds (default 2)")
    ev.add_argument("--layers", default=None, help="layer sizes for 'layered', e.g. 2,2")
    ev.add_argument("--mmlu-split", default="validation", choices=["dev", "validation", "test"])
    ev.add_argument("--sweep", action="store_true", help="gamma x capacity sweep (arrives with issue 6)")
    _add_common(ev, questions=10, warmup=2, max_new_tokens=128)

    bench = sub.add_parser("bench", help="TTFT benchmarks (arrives with issue 6)")
    bench.add_argument("what", nargs="?", default="ttft")
    return parser


def _config(args, task: str, n_agents: int, topology: str, rounds: int = 2, layers=None,
            mmlu_split: str = "validation"):
    from .runtime.session import ExperimentConfig
    pool = {k: v for k, v in (("gamma", args.gamma), ("capacity", args.capacity)) if v is not None}
    return ExperimentConfig(
        task=task, n_agents=n_agents, topology=topology, rounds=rounds, layers=layers,
        questions=args.questions, warmup=args.warmup, offset=args.offset,
        max_new_tokens=args.max_new_tokens, decision_dense=args.decision_dense,
        judge_shadow=not args.no_judge_shadow, model=args.model, device=args.device,
        dtype=args.dtype, pool=pool, progress=not args.no_progress, mmlu_split=mmlu_split)


def _run_and_report(cfg, args, title: str, engine_factory=None) -> int:
    from .runtime import report
    from .runtime.records import record_to_dict
    from .runtime.session import command_line, git_sha, run_experiment

    if args.questions < 1:
        print("kvcomm: --questions must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = run_experiment(cfg, engine_factory=engine_factory)
    total_s = time.perf_counter() - t0
    print()
    print(report.format_table(res.summary, res.warmup_summary,
                              title=f"{title}: {res.model_name} on {res.device_detail}"))
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
                                      "git_sha": git_sha(), "command": command_line(),
                                      "config": asdict(cfg)})
        report.write_json(doc, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot_ttft(res.summary, args.plot, title=f"{title}: TTFT per agent ({res.model_name})")
        print(f"wrote {args.plot}")
    if args.records:
        with open(args.records, "w", encoding="utf-8") as f:
            for r in res.records:
                f.write(json.dumps(record_to_dict(r), ensure_ascii=False) + "\n")
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
    cfg = _config(args, "gsm8k", 4, "fully_connected")
    return _run_and_report(cfg, args, "kvcomm demo (GSM8K, fully connected 4 agents + decision)",
                           engine_factory)


def cmd_eval(args, engine_factory=None) -> int:
    if args.sweep:
        print("kvcomm eval --sweep arrives with issue 6 (benchmarks); run without --sweep, "
              "setting --gamma/--capacity per run.", file=sys.stderr)
        return 2
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    cfg = _config(args, args.task, args.agents, args.topology, args.rounds, layers, args.mmlu_split)
    return _run_and_report(cfg, args, f"kvcomm eval ({args.task}, {args.topology}, "
                           f"{args.agents} agents + decision)", engine_factory)


def cmd_bench(args) -> int:
    print("kvcomm bench arrives with issue 6 (the paper's TTFT setting on GPU and CPU). "
          "Until then, `kvcomm demo` measures per-agent TTFT dense vs KVCOMM.", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "eval":
            return cmd_eval(args)
        return cmd_bench(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .runtime.datasets import DataNotInstalled
        if isinstance(e, DataNotInstalled):
            print(f"kvcomm: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
