"""Which part of the offset estimate decides first-token agreement with dense?

Runs engine_quality.py's 3-agent pipeline (solver -> critic -> judge) on the embedded
SmolLM2. After `--warm` requests fill the pools, every KVCOMM call of the next
`--measure` requests that takes the reuse path is compared with a dense prefill of the
identical prompt, and then re-run (same request, same decisions, same anchors, nothing
captured) once per variant of the estimate:

    spec          the method as written (docs/method.md, "Estimating the offset") in plain torch
                  (kvcomm.reference): must equal the core
    tau=<t>       the same with weight temperature t (the decision keeps tau=1)
    nearest       only the anchor whose values are nearest the content (one-hot weights)
    no_offset     bases and segment templates moved, no deltas at all
    placeholder   deltas on the placeholder tokens only, segments left as the template
    segment       deltas on the segments only, placeholders left as the moved base
    tail=<n>      the core's estimate, with the last n prompt tokens run exactly

and each re-run's first token is compared with the same dense prefill.

    python benchmarks/estimate_ablation.py --json results/quality/estimate-ablation-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from kvcomm import reference
from kvcomm.models import load_model

from .. import provenance
from . import engine_quality as eq  # the workload and its helpers


@dataclass(frozen=True)
class Variant:
    tau: float = 1.0
    nearest: bool = False
    placeholder_deltas: bool = True
    segment_deltas: bool = True


VARIANTS = {
    "spec": Variant(),
    "tau=0.1": Variant(tau=0.1),
    "tau=0.01": Variant(tau=0.01),
    "tau=10": Variant(tau=10.0),
    "nearest": Variant(nearest=True),
    "no_offset": Variant(placeholder_deltas=False, segment_deltas=False),
    "placeholder": Variant(segment_deltas=False),
    "segment": Variant(placeholder_deltas=False),
}


class _Used:
    def __init__(self, anchors):
        self.anchors = anchors


class VariantPool:
    """Stands in for the engine's AnchorPool: every method but estimate goes to the
    real pool; estimate reads the same anchors the core would use and computes a
    variant of docs/method.md, "Estimating the offset" with the pure-torch reference."""

    def __init__(self, pool, variant: Variant):
        self._pool, self._variant = pool, variant

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def usable_anchors(self, slot, agent, n, seg_len):
        """The anchors AnchorPool.estimate uses: length >= n, deltas for the agent
        (with a segment of seg_len tokens when there is one)."""
        ids, out = [], []
        for info in self._pool.anchors(slot):
            if info.length < n or agent not in info.agents:
                continue
            d = self._pool.anchor_deltas(slot, info.id, agent)
            if seg_len and (d["seg_k"] is None or d["seg_k"].shape[2] != seg_len):
                continue
            base_k, base_v = self._pool.anchor_base(slot, info.id)
            ids.append(info.id)
            out.append(dict(base_k=base_k, base_v=base_v, **d))
        return ids, out

    def estimate(self, slot, agent, base_k, base_v, inv_freq, position, dst_k, dst_v, seg_template_k=None,
                 seg_template_v=None, seg_position=0, seg_dst_k=None, seg_dst_v=None):
        v = self._variant
        seg_len = 0 if seg_template_k is None else seg_template_k.shape[2]
        ids, anchors = self.usable_anchors(slot, agent, base_k.shape[2], seg_len)
        if not anchors:
            return _Used([])
        if v.nearest:
            d = reference.value_distances(base_v, [a["base_v"] for a in anchors])
            anchors = [anchors[int(d.argmin())]]
        zero = set()
        if not v.placeholder_deltas:
            zero |= {"ph_k", "ph_v"}
        if not v.segment_deltas and seg_len:
            zero |= {"seg_k", "seg_v"}
        anchors = [{k: (torch.zeros_like(t) if k in zero else t) for k, t in a.items()} for a in anchors]
        k, val, sk, sv = reference.estimate(anchors, base_k, base_v, inv_freq, position, v.tau,
                                            seg_template_k, seg_template_v, seg_position)
        dst_k.copy_(k)
        dst_v.copy_(val)
        if seg_len:
            seg_dst_k.copy_(sk)
            seg_dst_v.copy_(sv)
        return _Used(ids)


def _rerun(eng, name, inputs, dense):
    """The same reuse call again, nothing captured; (agree, kl) or None off the reuse path."""
    again = eng.call(name, inputs, max_new_tokens=1, return_first_logits=True, capture=False)
    return list(eq._first_token_gap(again, dense)) if again.path == "reuse" else None


def compare_call(eng, name, inputs, call, tails) -> dict:
    dense = eng.call(name, inputs, mode="dense", max_new_tokens=1, return_first_logits=True)
    row = {"agent": name, "tokens": call.prompt_tokens, "core": list(eq._first_token_gap(call, dense))}
    real = eng.pool
    for label, variant in VARIANTS.items():
        eng.pool = VariantPool(real, variant)
        try:
            row[label] = _rerun(eng, name, inputs, dense)
        finally:
            eng.pool = real
    keep = eng.exact_tail
    for t in tails:
        eng.exact_tail = t
        try:
            row[f"tail={t}"] = _rerun(eng, name, inputs, dense)
        finally:
            eng.exact_tail = keep
    return row


def run_request(eng, question, max_new_tokens, compare, rows, tails):
    eng.new_request()
    replies: dict[str, str] = {}
    for name in eq.ORDER:
        inputs = eq.agent_inputs(name, question, replies)
        call = eng.call(name, inputs, max_new_tokens=max_new_tokens, return_first_logits=compare)
        replies[name] = call.text
        if compare and call.path == "reuse":
            rows.append(compare_call(eng, name, inputs, call, tails))


def summarize(rows, labels) -> dict:
    out = {}
    for label in labels:
        got = [r for r in rows if r.get(label) is not None]
        if not got:
            continue
        entry = {"calls": len(got), "top1_agreement": sum(r[label][0] for r in got) / len(got),
                 "mean_kl": statistics.fmean(r[label][1] for r in got),
                 "median_kl": statistics.median(r[label][1] for r in got)}
        for name in eq.ORDER:
            mine = [r for r in got if r["agent"] == name]
            if mine:
                entry[f"agreement_{name}"] = sum(r[label][0] for r in mine) / len(mine)
                entry[f"calls_{name}"] = len(mine)
        out[label] = entry
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eq.add_pipeline_args(p, measure=20)
    p.add_argument("--tails", default="16,64", help="exact_tail values to compare too, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    args = p.parse_args(argv)
    tails = eq.parse_tails(p, args.tails)
    if args.threads:
        torch.set_num_threads(args.threads)
    made = provenance.capture("python", "benchmarks/estimate_ablation.py", argv=argv)   # the code measured
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = load_model(args.model)
    pipeline = argparse.Namespace(gamma=0.3, tau=1.0, distance="frobenius", capacity=20, tails=[1])
    eng = eq.build_engine(model, tok, pipeline)
    rows: list = []
    t0 = time.perf_counter()
    for _ in range(args.warm):
        run_request(eng, eq.make_question(rng), args.max_new_tokens, False, rows, tails)
    for i in range(args.measure):
        run_request(eng, eq.make_question(rng), args.max_new_tokens, True, rows, tails)
        print(f"\r  request {i + 1}/{args.measure}: {len(rows)} reuse calls compared", end="", flush=True)
    print()
    labels = ["core", *VARIANTS, *(f"tail={t}" for t in tails)]
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "device": provenance.device_detail("cpu", model.dtype),
        "pool": {"gamma": 0.3, "tau": 1.0, "distance": "frobenius", "capacity": 20},
        "variants": {k: vars(v) for k, v in VARIANTS.items()},
        "summary": summarize(rows, labels),
        "rows": rows,
        "sizes": {"warm_requests": args.warm, "measured_requests": args.measure,
                  "max_new_tokens": args.max_new_tokens},
        "seconds": time.perf_counter() - t0,
        **made.fields(),
    }
    for label, s in result["summary"].items():
        per_agent = "  ".join(f"{n} {s[f'agreement_{n}']:.2f}/{s[f'calls_{n}']}" for n in eq.ORDER
                              if f"agreement_{n}" in s)
        print(f"{label:12s} top-1 {s['top1_agreement']:.3f}  mean KL {s['mean_kl']:.4f}  ({per_agent})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
