"""What compact anchor storage (PoolConfig.storage, docs/method.md, "Compact anchors") saves and costs.

Measured with the pool itself (kvcomm.AnchorPool), each part in the same run:

- bytes per anchor by storage: the embedded model from a pool saved by a real run
  (`--pool FILE`, loaded once per storage: the file's anchors converted), and a
  Llama-3.1-8B layout (32 layers, 8 KV heads, head_dim 128, bf16) for a 1024-token
  input with a 64-token segment after it, read by 4 agents (byte counts depend only on
  shapes and storage, so the 8B tensors are random);
- pool bytes against the number of agents that read one anchor (2-8), both layouts;
- the choice of scales: relative error (RMS of the error / RMS of the values) of int8
  and fp8 with one scale per (layer, head, channel) as the pool stores them, one per
  (layer, head, token), and one per (layer, head), on the saved pool's bases and deltas;
- the time of one slot estimate (AnchorPool.estimate: weights and offsets of K and V,
  all layers) from each storage, rounds interleaved, median.

    python benchmarks/anchor_memory.py --pool POOL_FILE [--out results/anchor-memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import kvcomm

from .. import provenance

STORAGES = ("model", "bf16", "int8", "fp8")
LLAMA8B = dict(layers=32, heads=8, dim=128, dtype=torch.bfloat16)


def _kv(layout: dict, tokens: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layout["layers"], layout["heads"], tokens, layout["dim"], generator=g) * scale
    return x.to(layout["dtype"])


def _config(storage: str, layout: dict, **kw) -> kvcomm.PoolConfig:
    return kvcomm.PoolConfig(storage=storage, layers=layout["layers"], kv_heads=layout["heads"],
                             head_dim=layout["dim"], **kw)


def bytes_by_agents(layout: dict, tokens: int, segment: int, agents: int = 8) -> dict:
    """{storage: [bytes of one anchor read by 1..agents agents]} (base + each agent's
    placeholder and segment deltas)."""
    base = _kv(layout, tokens)
    ph, seg = _kv(layout, tokens, 0.05, 1), _kv(layout, segment, 0.05, 2)
    out = {}
    for storage in STORAGES:
        pool = kvcomm.AnchorPool(_config(storage, layout))
        aid = pool.add_anchor("input", base, base)
        sizes = []
        for a in range(agents):
            pool.record_deltas("input", aid, f"agent{a}", ph, ph, seg, seg)
            sizes.append(pool.memory_bytes())
        out[storage] = sizes
    return out


def embedded_pool_bytes(path: str) -> dict:
    """Per storage: anchors, total bytes and bytes per anchor of the saved pool."""
    out = {}
    for storage in STORAGES:
        pool = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage))
        pool.load(path)
        n = pool.size()
        out[storage] = {"anchors": n, "bytes": pool.memory_bytes(),
                        "bytes_per_anchor": pool.memory_bytes() / max(n, 1),
                        "slots": len(pool.slots())}
    return out


def _rel_error(x: torch.Tensor, storage: str, groups: str) -> float:
    """Relative RMS error of x [L,H,T,D] stored in int8/fp8 with scales over `groups`."""
    x = x.float()
    dims = {"channel": (2,), "token": (3,), "layer_head": (2, 3)}[groups]  # channel: the pool's choice
    top = 127.0 if storage == "int8" else 448.0
    amax = x.abs().amax(dim=dims, keepdim=True)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    q = (x / scale).round().clamp(-127, 127) if storage == "int8" else \
        (x / scale).to(torch.float8_e4m3fn).float()
    back = q * scale
    return float((back - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt().clamp_min(1e-30))


def scale_choice(path: str) -> dict:
    """Mean relative error over the saved pool's tensors, by kind (base/delta, K/V)."""
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig())
    pool.load(path)
    errors: dict = {}
    for slot in pool.slots():
        for info in pool.anchors(slot):
            for name, (data, _) in pool.anchor_stored(slot, info.id).items():
                kind = ("base" if name.startswith("base") else
                        "segment_delta" if "/seg" in name else "placeholder_delta") + "_" + name[-1]
                for storage in ("int8", "fp8"):
                    for groups in ("channel", "token", "layer_head"):
                        errors.setdefault(kind, {}).setdefault(f"{storage}/{groups}", []).append(
                            _rel_error(data, storage, groups))
    return {kind: {k: round(statistics.mean(v), 5) for k, v in by.items()} | {"tensors": len(next(iter(by.values())))}
            for kind, by in errors.items()}


def estimate_times(layout: dict, tokens: int, segment: int, anchors: int, rounds: int) -> dict:
    """Per storage, the median ms of one slot estimate (placeholder + segment, K and V: what
    the reuse path runs per slot) and of one share decision (value distances to every
    anchor), all storages timed in interleaved rounds; with the bytes each reads at least
    (every stored anchor tensor it uses once, the request's inputs once, outputs written
    once) as GB/s."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, layout["dim"], 2).float() / layout["dim"]))
    pools = {}
    for storage in STORAGES:
        pool = kvcomm.AnchorPool(_config(storage, layout, capacity=max(anchors, 20)))
        for i in range(anchors):
            aid = pool.add_anchor("q", _kv(layout, tokens, seed=10 * i), _kv(layout, tokens, seed=10 * i + 1))
            pool.record_deltas("q", aid, "a", _kv(layout, tokens, 0.05, 10 * i + 2),
                               _kv(layout, tokens, 0.05, 10 * i + 3), _kv(layout, segment, 0.05, 10 * i + 4),
                               _kv(layout, segment, 0.05, 10 * i + 5))
        pools[storage] = pool
    base_k, base_v = _kv(layout, tokens, seed=1001), _kv(layout, tokens, seed=1002)
    tmpl_k, tmpl_v = _kv(layout, segment, seed=1003), _kv(layout, segment, seed=1004)
    dst = [torch.empty_like(base_k), torch.empty_like(base_v), torch.empty_like(tmpl_k), torch.empty_like(tmpl_v)]
    request_bytes = 2 * sum(t.nbytes for t in (base_k, base_v, tmpl_k, tmpl_v))  # read + dst written

    def estimate(pool):
        assert pool.estimate("q", "a", base_k, base_v, inv_freq, 100, dst[0], dst[1], tmpl_k, tmpl_v,
                             100 + tokens, dst[2], dst[3]).ok

    def decide(pool):
        pool.decide("q", base_v, credit=False)

    out = {"tokens": tokens, "segment": segment, "anchors": anchors, "rounds": rounds,
           "load_average_1m_before": provenance.load_1m()}
    for name, fn in (("estimate", estimate), ("decide", decide)):
        times = {s: [] for s in STORAGES}
        for r in range(rounds + 1):
            for storage, pool in pools.items():
                t0 = time.perf_counter()
                fn(pool)
                if r:  # the first round warms up
                    times[storage].append((time.perf_counter() - t0) * 1e3)
        med = {s: statistics.median(v) for s, v in times.items()}
        read = {}
        for storage, pool in pools.items():
            stored = [pool.anchor_stored("q", a.id) for a in pool.anchors("q")]
            names = None if name == "estimate" else ("base_v",)
            read[storage] = sum(d.nbytes + (0 if sc is None else sc.nbytes) for st in stored
                                for k, (d, sc) in st.items() if names is None or k in names)
            read[storage] += request_bytes if name == "estimate" else base_v.nbytes
        out[name] = {"ms": {s: round(v, 2) for s, v in med.items()},
                     "ratio_to_model": {s: round(med[s] / med["model"], 3) for s in STORAGES},
                     "bytes": read, "gbps": {s: round(read[s] / med[s] / 1e6, 2) for s in STORAGES}}
    return out


def budget_fidelity(fidelity_json: str) -> list[dict]:
    """The paired (teacher-forced) fidelity of every setting in a `kvcomm eval --paired
    --fidelity-json` file (a run's own settings and each --paired-variant), with the pool each
    setting ended with (anchors, stored bytes; absent in entries filed before it was recorded)."""
    with open(fidelity_json) as f:
        runs = json.load(f)["runs"]
    keep = ("task", "agents", "questions", "warmup", "pool", "recompute", "partial", "commit",
            "command", "first_token_agreement", "first_token_kl", "tf32_agreement", "tf32_kl", "paired_calls",
            "token_reuse", "call_reuse_or_partial", "by_anchors", "final_pool")
    out = []
    for run in runs:
        row = {k: run[k] for k in keep if k in run}
        row["storage"] = run["pool"].get("storage", "model")
        row["byte_budget"] = run["pool"].get("byte_budget", 0)
        out.append(row)
    return out


def _ratios(sizes: dict, reference: float) -> dict:
    return {s: round(reference / v, 3) for s, v in sizes.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True, help="a pool file saved by a run on the embedded model")
    p.add_argument("--out", default="results/anchor-memory.json")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds of the estimate benchmark")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fidelity", action="append", default=[], metavar="FIDELITY_JSON",
                   help="file the settings of a `kvcomm eval --paired --fidelity-json` run under "
                        "fixed_budget_fidelity; repeatable")
    p.add_argument("--only-fidelity", action="store_true",
                   help="update fixed_budget_fidelity in --out and measure nothing")
    args = p.parse_args(argv)
    fidelity = [row for path in args.fidelity for row in budget_fidelity(path)]
    if args.only_fidelity:
        with open(args.out) as f:
            doc = json.load(f)
        doc["fixed_budget_fidelity"] = fidelity
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        return 0
    torch.set_num_threads(args.threads)
    made = provenance.capture("python", "benchmarks/anchor_memory.py", argv=argv)   # the code measured
    t0 = time.time()
    embedded = embedded_pool_bytes(args.pool)
    emb_layout = dict(layers=30, heads=3, dim=64, dtype=torch.float32)
    fp32_per_anchor = embedded["model"]["bytes_per_anchor"]
    by_agents_8b = bytes_by_agents(LLAMA8B, 1024, 64)
    by_agents_emb = bytes_by_agents(emb_layout, 1024, 64)
    four_8b = {s: v[3] for s, v in by_agents_8b.items()}
    doc = {
        "about": "Anchor bytes, scale choice and estimate time by anchor storage "
                 "(kvcomm_app/bench/anchor_memory.py; docs/benchmarks.md 'Compact anchors').",
        # `commit`: the name this file has always used for the sha
        "commit": made.git_sha, "git_dirty": made.git_dirty, "command": made.command,
        "torch": torch.__version__, "threads": args.threads,
        "embedded_pool": {"file": os.path.basename(args.pool), "by_storage": embedded,
                          "fp32_over": _ratios({s: v["bytes_per_anchor"] for s, v in embedded.items()},
                                               fp32_per_anchor)},
        "llama8b_anchor_1024_tokens_4_agents": {
            "layout": "32 layers, 8 KV heads, head_dim 128, bf16; 1024-token input, 64-token segment",
            "bytes": four_8b, "bf16_over": _ratios(four_8b, four_8b["model"]),
            "fp32_over": _ratios(four_8b, 2 * four_8b["model"])},
        "pool_bytes_vs_agents": {"agents": list(range(1, 9)), "llama8b": by_agents_8b,
                                 "embedded_1024_tokens": by_agents_emb},
        "scale_choice": scale_choice(args.pool),
        "estimate_ms": {
            "embedded_1024_tokens_4_anchors": estimate_times(emb_layout, 1024, 64, 4, args.rounds),
            "embedded_1024_tokens_20_anchors": estimate_times(emb_layout, 1024, 64, 20, args.rounds),
            "llama8b_1024_tokens_4_anchors": estimate_times(LLAMA8B, 1024, 64, 4, max(3, args.rounds // 2)),
        },
        "run_s": round(time.time() - t0, 1),
        "load_average_1m_at_end": provenance.load_1m(),
    }
    if fidelity:
        doc["fixed_budget_fidelity"] = fidelity
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if os.path.exists(args.out):  # keep sections other commands filed (the fidelity comparison)
        with open(args.out) as f:
            old = json.load(f)
        doc = {**old, **doc}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({k: doc[k] for k in ("embedded_pool", "llama8b_anchor_1024_tokens_4_agents",
                                          "scale_choice", "estimate_ms")}, indent=1))
    return 0
