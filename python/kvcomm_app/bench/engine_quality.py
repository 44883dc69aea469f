"""Engine quality and TTFT on CPU: KVCOMM reuse path vs dense prefill, same prompts.

Workload: a 3-agent fully connected math pipeline (solver -> critic -> judge, each
reading the question and every earlier reply) over generated word problems.

Quality: after `--warm` requests fill the anchor pools, every KVCOMM call of the
next `--measure` requests that takes the reuse path is compared with a dense
prefill of the *identical* prompt: first-token top-1 agreement and
KL(dense || reuse) of the first-token distributions.

TTFT: `--ttft-requests` requests whose questions carry a long context passage, so
the judge's prompt is ~1K tokens; per agent, median TTFT of the reuse path
(everything counted: encoding inputs, decisions, estimate, last-token forward)
vs a dense prefill of the same prompt.

    python benchmarks/engine_quality.py                 # embedded SmolLM2, defaults
    python benchmarks/engine_quality.py --json results/quality/engine-quality-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

import kvcomm
from kvcomm.engine import KVCommEngine
from kvcomm.models import load_model

from .. import provenance

SYSTEM = {
    "solver": "You are a careful math solver. Work through the problem one step at a time and finish "
              "with the final number.",
    "critic": "You are a strict reviewer of math solutions. Read the problem and the proposed solution, "
              "check every step, and say whether the solution is right.",
    "judge": "You are the final judge of a team of math agents. Read the problem and what the team "
             "wrote, then state the final answer as a single number.",
}
TEMPLATES = {
    "solver": "Problem:\n{user_question}\n\nSolve the problem step by step.",
    "critic": "Problem:\n{user_question}\n\nProposed solution:\n{agent_solver_current}\n\n"
              "Check the solution. Is it correct?",
    "judge": "Problem:\n{user_question}\n\nSolver:\n{agent_solver_current}\n\nReviewer:\n"
             "{agent_critic_current}\n\nWhat is the final answer?",
}
ORDER = ("solver", "critic", "judge")

NAMES = ["Tom", "Sara", "Ben", "Lily", "Omar", "Mia", "Ravi", "Anna", "Jack", "Zoe", "Ken", "Ella"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]
PLACES = ["market", "school", "library", "park", "bakery", "museum"]
PROBLEMS = [
    "{a} has {x} {item} and buys {y} more at the {place}. How many {item} does {a} have now?",
    "{a} had {z} {item} and gave {x} of them to {b}. How many {item} does {a} have left?",
    "A box holds {x} {item}. {a} fills {y} boxes. How many {item} are there in total?",
    "{a} shares {w} {item} equally among {x} friends. How many {item} does each friend get?",
    "{a} reads {x} pages every day for {y} days, then {b} reads {z} pages. How many pages did they "
    "read together?",
    "A bus leaves the {place} with {z} people. At the first stop {x} get off and {y} get on. How many "
    "people are on the bus now?",
    "{a} earns {x} dollars an hour and works {y} hours, then spends {z} dollars at the {place}. How "
    "much money is left?",
    "{a} and {b} collect {item}. {a} has {x} and {b} has {y} more than {a}. How many {item} do they "
    "have together?",
]
FACTS = [
    "The {place} opens at {h} in the morning and closes in the evening.",
    "{a} usually walks to the {place} with {b}, which takes about {x} minutes.",
    "Last week {b} counted {z} {item} in a drawer but lost a few of them.",
    "Every visitor to the {place} gets a small map and a list of rules.",
    "{a} keeps a notebook where every purchase and every gift is written down.",
    "The prices at the {place} did not change during the whole month.",
    "{b} prefers {item} to anything else and talks about them all the time.",
    "On rainy days the {place} is quieter, and the staff have more time to help.",
]


def make_question(rng: random.Random, context_sentences: int = 0) -> str:
    a, b = rng.sample(NAMES, 2)
    x, y = rng.randint(2, 19), rng.randint(2, 19)
    vals = dict(a=a, b=b, x=x, y=y, z=rng.randint(20, 90), w=x * rng.randint(2, 9), item=rng.choice(ITEMS),
                place=rng.choice(PLACES), h=rng.randint(7, 10))
    q = rng.choice(PROBLEMS).format(**vals)
    if context_sentences:
        facts = [rng.choice(FACTS).format(**vals) for _ in range(context_sentences)]
        q = "Background notes:\n" + " ".join(facts) + "\n\nQuestion: " + q
    return q


def build_engine(model, tok, args) -> KVCommEngine:
    s = kvcomm.hf.inspect_model(model)
    cfg = kvcomm.PoolConfig(gamma=args.gamma, tau=args.tau, distance=args.distance, capacity=args.capacity,
                            layers=s.num_layers, kv_heads=s.kv_heads, head_dim=s.head_dim)
    eng = KVCommEngine(model, tok, pool_config=cfg, exact_tail=args.tails[0])
    for name in ORDER:
        eng.add_agent(name, SYSTEM[name], TEMPLATES[name])
    return eng


def _first_token_gap(call, dense) -> tuple[bool, float]:
    """(top-1 equal, KL(dense || call)) of two calls' first-token distributions."""
    logp_r = torch.log_softmax(call.first_logits.double(), -1)
    logp_d = torch.log_softmax(dense.first_logits.double(), -1)
    return call.first_token_id == dense.first_token_id, float((logp_d.exp() * (logp_d - logp_r)).sum())


def _dense_view_of(call, dense) -> dict:
    """How sure dense prefill was of its first token, and where the call's token ranks in
    dense's distribution (0: dense's own choice, 1: its second choice, ...). A flat dense
    distribution (a small top-1 minus top-2 margin) flips on a small KV error."""
    probs = torch.softmax(dense.first_logits.double(), -1)
    top2 = torch.topk(probs, 2).values
    rank = int((probs > probs[call.first_token_id]).sum())
    return {"dense_margin": float(top2[0] - top2[1]), "rank_in_dense": rank}


# Bins of the dense top-1 minus top-2 probability margin, for agreement by confidence.
MARGIN_BINS = ((0.0, 0.1), (0.1, 0.3), (0.3, 1.01))


def agreement_by_dense_margin(reuse_rows: list) -> dict:
    """Top-1 agreement of the reuse calls grouped by how sure dense was, and what the
    disagreeing calls picked instead (their token's rank in dense's distribution)."""
    rows = [r for r in reuse_rows if "dense_margin" in r]
    if not rows:
        return {}
    bins = {}
    for lo, hi in MARGIN_BINS:
        mine = [r for r in rows if lo <= r["dense_margin"] < hi]
        bins[f"{lo:.1f}-{min(hi, 1.0):.1f}"] = {
            "calls": len(mine), "top1_agreement": sum(r["agree"] for r in mine) / len(mine) if mine else None}
    missed = [r for r in rows if not r["agree"]]
    missed_margin = statistics.median(r["dense_margin"] for r in missed) if missed else None
    return {"bins": bins, "disagreements": len(missed),
            "disagreement_dense_margin_median": missed_margin,
            "disagreement_picked_dense_second": sum(r["rank_in_dense"] == 1 for r in missed),
            "disagreement_picked_dense_top5": sum(r["rank_in_dense"] < 5 for r in missed)}


def _other_tails(eng, name: str, inputs: dict, dense, tails) -> dict:
    """The same reuse call again with each other exact_tail (decisions are per request,
    so the slots and anchors are the ones the compared call used)."""
    out, keep = {}, eng.exact_tail
    try:
        for t in tails:
            eng.exact_tail = t
            # capture=False: the re-run's one-token reply must not replace the real one
            # as the base downstream agents read, nor go through the reply decision.
            again = eng.call(name, inputs, max_new_tokens=1, return_first_logits=True, capture=False)
            if again.path == "reuse":
                agree, kl = _first_token_gap(again, dense)
                out[str(t)] = {"agree": agree, "kl": kl, "ttft_ms": again.ttft_ms}
    finally:
        eng.exact_tail = keep
    return out


def agent_inputs(name: str, question: str, replies: dict) -> dict:
    """What agent `name` reads: the question and every earlier agent's reply."""
    inputs = {"user_question": question}
    for other in ("solver", "critic"):
        if "{agent_%s_current}" % other in TEMPLATES[name]:
            inputs[f"agent_{other}_current"] = replies[other]
    return inputs


def add_pipeline_args(p: argparse.ArgumentParser, measure: int) -> None:
    p.add_argument("--model", default=None, help="local transformers model folder (default: embedded SmolLM2)")
    p.add_argument("--warm", type=int, default=10, help="requests that fill the pool before measuring")
    p.add_argument("--measure", type=int, default=measure, help="requests whose reuse calls are compared")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")


def parse_tails(p: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tails: comma-separated integers, got {text!r}")


def run_request(eng, question: str, max_new_tokens: int, compare: bool, rows: list, ttft: dict | None,
                other_tails=()):
    eng.new_request()
    replies: dict[str, str] = {}
    for name in ORDER:
        inputs = agent_inputs(name, question, replies)
        call = eng.call(name, inputs, max_new_tokens=max_new_tokens, return_first_logits=compare)
        replies[name] = call.text
        if not (compare and call.path == "reuse"):
            rows.append({"agent": name, "path": call.path, "reason": call.reason})
            continue
        dense = eng.call(name, inputs, mode="dense", max_new_tokens=1, return_first_logits=True)
        agree, kl = _first_token_gap(call, dense)
        rows.append({"agent": name, "path": "reuse", "reason": call.reason, "agree": agree, "kl": kl,
                     **_dense_view_of(call, dense), "tokens": call.prompt_tokens,
                     "ttft_reuse": call.ttft_ms, "ttft_dense": dense.ttft_ms,
                     "tails": _other_tails(eng, name, inputs, dense, other_tails)})
        if ttft is not None:
            ttft.setdefault(name, []).append((call.prompt_tokens, call.ttft_ms, dense.ttft_ms, call.timings))


def summarize_quality(rows: list) -> dict:
    reuse = [r for r in rows if r["path"] == "reuse"]
    out = {"calls": len(rows), "reuse_calls": len(reuse),
           "reuse_rate": len(reuse) / max(len(rows), 1)}
    if reuse:
        kls = [r["kl"] for r in reuse]
        out.update(top1_agreement=sum(r["agree"] for r in reuse) / len(reuse), mean_kl=statistics.fmean(kls),
                   median_kl=statistics.median(kls), max_kl=max(kls))
        for name in ORDER:
            mine = [r for r in reuse if r["agent"] == name]
            if mine:
                out[f"agreement_{name}"] = sum(r["agree"] for r in mine) / len(mine)
        out["by_dense_margin"] = agreement_by_dense_margin(reuse)
    tails = sorted({t for r in reuse for t in r.get("tails", {})}, key=int)
    if tails:
        out["other_exact_tails"] = {}
        for t in tails:
            got = [r["tails"][t] for r in reuse if t in r["tails"]]
            out["other_exact_tails"][t] = {"calls": len(got), "top1_agreement": sum(g["agree"] for g in got) / len(got),
                                           "mean_kl": statistics.fmean(g["kl"] for g in got),
                                           "median_ttft_ms": statistics.median(g["ttft_ms"] for g in got)}
    reasons: dict[str, int] = {}
    for r in rows:
        if r["path"] != "reuse":
            key = r["reason"].split(":")[-1].strip() if r["reason"].startswith("slot") else r["reason"]
            reasons[key] = reasons.get(key, 0) + 1
    out["dense_reasons"] = reasons
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p, measure=40)
    p.add_argument("--ttft-requests", type=int, default=6, help="long-prompt requests timed (after warm-up)")
    p.add_argument("--ttft-warm", type=int, default=4, help="long-prompt warm-up requests")
    p.add_argument("--context-sentences", type=int, default=40,
                   help="background sentences per long question (40: ~650 tokens, judge prompt ~1K)")
    p.add_argument("--ttft-new-tokens", type=int, default=128)
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--distance", default="frobenius", choices=["frobenius", "rms"])
    p.add_argument("--capacity", type=int, default=20)
    p.add_argument("--tails", default="1",
                   help="exact_tail values, comma-separated: the first runs the pipeline; every compared "
                        "reuse call is also run with the others (default 1: last token only, as the paper)")
    p.add_argument("--quality-only", action="store_true", help="skip the long-prompt TTFT part")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args(argv)
    args.tails = parse_tails(p, args.tails)
    if not args.tails:
        p.error("--tails: give at least one value")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    made = provenance.capture("python", "benchmarks/engine_quality.py", argv=argv)   # the code measured
    load_at_start = provenance.load_average()  # other work on the machine skews the TTFT numbers: recorded
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}", flush=True)

    # -- quality: short prompts, many requests
    eng = build_engine(model, tok, args)
    rows: list = []
    t0 = time.perf_counter()
    for i in range(args.warm):
        run_request(eng, make_question(rng), args.max_new_tokens, False, [], None)
    for i in range(args.measure):
        run_request(eng, make_question(rng), args.max_new_tokens, True, rows, None, args.tails[1:])
        done = summarize_quality(rows)
        print(f"\r  quality {i + 1}/{args.measure}: reuse {done['reuse_calls']}/{done['calls']}, top-1 "
              f"{done.get('top1_agreement', float('nan')):.3f}, mean KL {done.get('mean_kl', float('nan')):.4f}",
              end="", flush=True)
    print()
    quality = summarize_quality(rows)
    quality["seconds"] = time.perf_counter() - t0
    quality["pool"] = {k: v for k, v in eng.stats().items() if k in ("anchors", "bytes", "evictions", "slots")}

    # -- TTFT: long prompts (~1K tokens for the judge)
    eng = build_engine(model, tok, args)
    ttft: dict = {}
    trow: list = []
    if args.quality_only:
        args.ttft_warm = args.ttft_requests = 0
    for i in range(args.ttft_warm):
        run_request(eng, make_question(rng, args.context_sentences), args.ttft_new_tokens, False, [], None)
    for i in range(args.ttft_requests):
        run_request(eng, make_question(rng, args.context_sentences), args.ttft_new_tokens, True, trow, ttft,
                    args.tails[1:])
        print(f"\r  ttft {i + 1}/{args.ttft_requests}", end="", flush=True)
    print()
    ttft_rows = []
    for name in ORDER:
        got = ttft.get(name, [])
        if not got:
            ttft_rows.append({"agent": name, "reuse_calls": 0})
            continue
        reuse_ms = statistics.median(g[1] for g in got)
        dense_ms = statistics.median(g[2] for g in got)
        parts = {k: statistics.median(g[3][k] for g in got) for k in ("encode", "decide", "estimate", "forward")}
        ttft_rows.append({"agent": name, "reuse_calls": len(got), "tokens": int(statistics.median(g[0] for g in got)),
                          "dense_ms": dense_ms, "kvcomm_ms": reuse_ms, "speedup": dense_ms / reuse_ms,
                          "kvcomm_parts_ms": parts})
    long_quality = summarize_quality(trow)

    result = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "device": provenance.device_detail("cpu", model.dtype),
        "pool": {"gamma": args.gamma, "tau": args.tau, "distance": args.distance, "capacity": args.capacity},
        "exact_tail": args.tails[0],
        "quality": quality, "ttft": ttft_rows, "long_prompt_quality": long_quality,
        "sizes": {"warm_requests": args.warm, "measured_requests": args.measure,
                  "max_new_tokens": args.max_new_tokens, "ttft_warm_requests": args.ttft_warm,
                  "ttft_requests": args.ttft_requests, "ttft_new_tokens": args.ttft_new_tokens,
                  "context_sentences": args.context_sentences,
                  "quality_prompt_tokens": _token_range(rows), "ttft_prompt_tokens": _token_range(trow)},
        **made.fields(),
        "versions": {"torch": torch.__version__, "transformers": provenance.package_version("transformers")},
        "load_avg": {"start": load_at_start, "end": provenance.load_average()},
    }
    print(json.dumps({k: result[k] for k in ("quality", "ttft", "long_prompt_quality")}, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _token_range(rows: list) -> dict | None:
    """Prompt sizes of the compared (reuse) calls, per agent: min / median / max tokens."""
    out = {}
    for name in ORDER:
        n = sorted(r["tokens"] for r in rows if r["path"] == "reuse" and r["agent"] == name)
        if n:
            out[name] = {"min": n[0], "median": statistics.median(n), "max": n[-1]}
    return out or None


if __name__ == "__main__":
    sys.exit(main())
