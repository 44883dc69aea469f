"""Op-level benchmark of torch.ops.kvcomm against the same computation in plain torch.

For every op, and for the estimate of one slot (AnchorPool.estimate: token and
segment weights plus the fused offsets of K and V, all layers), on one or more
model shapes: the time per call, the bytes the op must move at minimum (each
input read once, each output written once), the achieved GB/s and its fraction
of the memory bandwidth, and the same computation written with plain torch
ops, timed in the same run. Each kvcomm result is checked against its torch
twin before it is timed, so a fast wrong kernel cannot post a number.

CPU (the default without a GPU): wall time, kvcomm and torch calls interleaved
(one of each per round, median over the rounds) so a machine whose load drifts
shifts both alike; at each --threads count (torch.set_num_threads); the
bandwidth yardstick is a large memory copy (torch's copy_) measured in the same
run at the same thread count. Default cases: the embedded model's shape
(SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, fp32) and a Llama-3.1-8B
shape (32 layers, 8 KV heads, head_dim 128, bf16), 1024 tokens, 4 and 20
anchors, at 1 and 2 threads.

GPU: CUDA events, after warm-up, the L2 cache flushed before each call (a 50 MB
L2 would otherwise hold the 512-token inputs), median over --iters calls; the
yardstick is the device's data-sheet peak. Default case: the Llama-3.1-8B
shape in bf16 at 512, 1024 and 3072 tokens, 4 and 20 anchors.

    python benchmarks/ops.py --device cpu              # both CPU cases, 1 and 2 threads
    python benchmarks/ops.py                           # GPU when there is one
    python benchmarks/ops.py --device cpu --quick --out /tmp/ops.json --md /tmp/b.md

Writes results/ops/ops-<device>.json (rows: op, case, shape, threads, ms, bytes,
gbps, fraction_of_copy, fraction_of_peak, torch_ms, speedup_vs_torch; top
level: device, copy_gbps per thread count, peak_gbps, cpu_capability, git_sha,
command, targets) and this device's block of the "Op benchmarks" section of
docs/benchmarks.md (other text is left alone).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import kvcomm  # noqa: F401  (registers torch.ops.kvcomm)
from kvcomm import ops, reference
from kvcomm_app import provenance

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Op benchmarks"

# Peak memory bandwidth (GB/s) by device name, from the vendors' data sheets.
# Checked in order: the first pattern found in the name wins.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (HBM3), reported as "NVIDIA H100 80GB HBM3"
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
]

# Ops that only stream memory (a handful of flops per byte): these are held to
# a fraction of the copy bandwidth.
STREAMING = ("rope_move", "rope_move_", "value_distances", "token_weights", "segment_weights",
             "fused_offset", "fused_offset_into")


# ---- plain-torch twins: what a user would write without kvcomm -------------

def torch_rope(x, inv_freq, shift):
    half = x.shape[-1] // 2
    angle = shift.reshape(-1, 1).float() * inv_freq  # [1 or T, D/2]
    cos, sin = angle.cos(), angle.sin()
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def torch_value_distances(content, anchors):
    n = content.shape[2]
    return torch.stack([torch.linalg.vector_norm(content.float() - a[:, :, :n].float()) for a in anchors])


def torch_match_decide(d, tau=1.0, gamma=0.3, top_p=0.9):
    # All on the device (no host read), like the op.
    n = d.numel()
    p = torch.softmax(-d / tau, 0)
    entropy = -(p * torch.log2(p.clamp_min(1e-30))).sum()
    share = (entropy <= gamma * math.log2(max(n, 2))) & (n >= 2)
    sp, order = torch.sort(p, descending=True, stable=True)
    before = torch.cumsum(sp, 0) - sp  # mass of the more probable anchors
    credit = torch.zeros_like(p, dtype=torch.bool).scatter(0, order, before < top_p) & share
    return p, entropy, share, credit


def torch_token_weights(base, anchors, tau=1.0):
    n = base.shape[2]
    s = torch.stack([(base.float() - a[:, :, :n].float()).abs().mean(dim=(0, 1, 3)) for a in anchors])
    return torch.softmax(-s / tau, 0)


def torch_segment_weights(base, anchors, tau=1.0):
    n = base.shape[2]
    r = torch.stack([(base.float() - a[:, :, a.shape[2] - n:].float()).pow(2).sum(2).sqrt()
                     for a in anchors])
    return torch.softmax(-r / tau, 0)


def torch_fused_offset(base, deltas, weights, shift, inv_freq):
    L, H, T, D = base.shape
    acc = base.to(torch.float32, copy=True)
    for u, d in enumerate(deltas):
        w = weights[u].view(1, 1, T, 1) if weights.dim() == 2 else weights[u].view(L, H, 1, D)[1:]
        acc[1:] += w * d[1:, :, :T].float()
    if inv_freq is not None:
        return torch_rope(acc, inv_freq, shift).to(base.dtype)
    return acc.to(base.dtype)


def torch_estimate(s, tau=1.0):
    """The estimate of one slot (placeholder + following segment, K and V) as
    the plain-torch sequence of weights and offsets, written into s's dsts."""
    bk, bv = [a["base_k"] for a in s["anchors"]], [a["base_v"] for a in s["anchors"]]
    n = s["base_k"].shape[2]
    wk, wv = torch_token_weights(s["base_k"], bk, tau), torch_token_weights(s["base_v"], bv, tau)
    s["dst_k"].copy_(torch_fused_offset(s["base_k"], [a["ph_k"][:, :, :n] for a in s["anchors"]], wk,
                                        s["shift"], s["inv_freq"]))
    s["dst_v"].copy_(torch_fused_offset(s["base_v"], [a["ph_v"][:, :, :n] for a in s["anchors"]], wv,
                                        s["shift"], None))
    ck, cv = torch_segment_weights(s["base_k"], bk, tau), torch_segment_weights(s["base_v"], bv, tau)
    s["seg_dst_k"].copy_(torch_fused_offset(s["seg_k"], [a["seg_k"] for a in s["anchors"]], ck,
                                            s["seg_shift"], s["inv_freq"]))
    s["seg_dst_v"].copy_(torch_fused_offset(s["seg_v"], [a["seg_v"] for a in s["anchors"]], cv,
                                            s["seg_shift"], None))


def ops_estimate(s, tau=1.0):
    """The same sequence with one kvcomm op call per step (what AnchorPool.estimate
    runs on a GPU)."""
    bk, bv = [a["base_k"] for a in s["anchors"]], [a["base_v"] for a in s["anchors"]]
    ops.fused_offset_into(s["dst_k"], s["base_k"], [a["ph_k"] for a in s["anchors"]],
                          ops.token_weights(s["base_k"], bk, tau), s["shift"], s["inv_freq"])
    ops.fused_offset_into(s["dst_v"], s["base_v"], [a["ph_v"] for a in s["anchors"]],
                          ops.token_weights(s["base_v"], bv, tau), s["shift"], None)
    ops.fused_offset_into(s["seg_dst_k"], s["seg_k"], [a["seg_k"] for a in s["anchors"]],
                          ops.segment_weights(s["base_k"], bk, tau), s["seg_shift"], s["inv_freq"])
    ops.fused_offset_into(s["seg_dst_v"], s["seg_v"], [a["seg_v"] for a in s["anchors"]],
                          ops.segment_weights(s["base_v"], bv, tau), s["seg_shift"], None)


# ---- timing -----------------------------------------------------------------

class Timer:
    def __init__(self, device: torch.device, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.cuda = device.type == "cuda"
        # Bigger than any L2 (H100: 50 MB, H200: 60 MB, B200: 126 MB).
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None

    def _once(self, fn) -> float:
        if self.cuda:
            self.flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def ms(self, *fns) -> list[float]:
        """Median ms of each function, calls interleaved round by round."""
        for _ in range(self.warmup):
            for fn in fns:
                fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = [[] for _ in fns]
        for _ in range(self.iters):
            for i, fn in enumerate(fns):
                times[i].append(self._once(fn))
        return [statistics.median(t) for t in times]


def measured_copy_gbps(device: torch.device, timer: Timer) -> float:
    # CPU: 256 MB, well past the last-level cache of any server CPU.
    n = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    (ms,) = timer.ms(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_for(name: str):
    for pattern, gbps in PEAK_GBPS:
        if pattern.lower() in name.lower():
            return gbps, f"data sheet ({pattern})"
    return None, None


# ---- the benchmark ------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inv_freq(dim: int, device) -> torch.Tensor:
    return (1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).to(device)


def check(name, got, want, dtype):
    atol, rtol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 3e-2),
                  torch.float16: (8e-3, 8e-3)}[dtype]
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        if g.dtype == torch.bool:
            assert torch.equal(g, w), f"{name}: kvcomm and torch disagree"
        else:
            torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol,
                                       msg=lambda m: f"{name}: kvcomm and torch disagree: {m}")


class Bench:
    """Times kvcomm against its torch twin and collects the rows."""

    def __init__(self, device, timer, yardstick_gbps, peak, threads):
        self.device, self.timer, self.rows = device, timer, []
        self.yardstick, self.peak, self.threads = yardstick_gbps, peak, threads

    def add(self, op, case, shape, nbytes, fn, twin, check_fn, extra=None):
        check_fn()
        fns = [fn, twin] + ([extra[1]] if extra else [])
        ms, tms, *more = self.timer.ms(*fns)
        gbps = nbytes / (ms * 1e-3) / 1e9
        row = dict(op=op, case=case, shape=shape, threads=self.threads, ms=round(ms, 4), bytes=int(nbytes),
                   gbps=round(gbps, 2), fraction_of_copy=round(gbps / self.yardstick, 3),
                   torch_ms=round(tms, 4), speedup_vs_torch=round(tms / ms, 2))
        if self.device.type == "cpu":
            # The machine's 1-minute load average when the row was timed: other
            # processes on a small host move every CPU number.
            row["load_avg_1m"] = provenance.load_1m()
        if self.peak:
            row["fraction_of_peak"] = round(gbps / self.peak, 3)
        if extra:
            row[f"{extra[0]}_ms"] = round(more[0], 4)
            row[f"speedup_vs_{extra[0]}"] = round(more[0] / ms, 2)
        self.rows.append(row)
        thr = f"{self.threads}t " if self.threads else ""
        tail = f" | {extra[0]} {more[0]:9.3f} ms x{more[0] / ms:.2f}" if extra else ""
        print(f"{thr}{op:18s} {shape:36s} {ms:9.3f} ms {gbps:7.1f} GB/s {gbps / self.yardstick:6.1%} "
              f"| torch {tms:9.3f} ms x{tms / ms:.2f}{tail}"
              + (f" | load {row['load_avg_1m']:.1f}" if "load_avg_1m" in row else ""), flush=True)


def into(dst, base, deltas, weights, shift):
    """fused_offset_into for values, returning a copy of what it wrote."""
    ops.fused_offset_into(dst, base, deltas, weights, shift, None)
    return dst.clone()


def op_rows(b: Bench, case: dict, T: int, gen) -> None:
    device, dtype, name = b.device, case["dtype"], case["name"]
    L, H, D = case["layers"], case["heads"], case["dim"]
    esize = torch.finfo(dtype).bits // 8
    f = inv_freq(D, device)

    def kv(tokens, scale=1.0):
        return (torch.randn(L, H, tokens, D, generator=gen) * scale).to(device=device, dtype=dtype)

    def same(op, fn, twin):
        return lambda: check(op, fn(), twin(), dtype)

    elems = L * H * T * D
    tag = f"L{L} H{H} T{T} D{D} {case['dtype_name']}"
    keys = kv(T)
    shift = torch.tensor(T + 17, device=device)
    rope, rope_twin = (lambda: ops.rope_move(keys, f, shift)), (lambda: torch_rope(keys, f, shift))
    b.add("rope_move", name, tag, 2 * elems * esize, rope, rope_twin, same("rope_move", rope, rope_twin))
    buf = kv(T + 64)
    view = buf[:, :, 32:32 + T]  # a slice of a [L, H, Tmax, D] cache buffer
    b.add("rope_move_", name, tag + " slice", 2 * elems * esize, lambda: ops.rope_move_(view, f, shift),
          lambda: view.copy_(torch_rope(view, f, shift)),
          same("rope_move_", lambda: ops.rope_move(view, f, shift), lambda: torch_rope(view, f, shift)))
    del buf, view, keys
    for N in case["anchors"]:
        ntag = f"{tag} N{N}"
        base = kv(T)
        anchors = [kv(T + 3 * u, 1.0) for u in range(N)]
        deltas = [kv(T, 0.05) for _ in range(N)]
        content_bytes = (N + 1) * elems * esize  # content + the first T tokens of N anchors
        vd, vd_twin = (lambda: ops.value_distances(base, anchors)), (lambda: torch_value_distances(base, anchors))
        # Checked against the reference's float64 sum: a float32 norm over tens of
        # millions of terms (the twin) is itself off by ~1e-3.
        b.add("value_distances", name, ntag, content_bytes, vd, vd_twin,
              lambda: torch.testing.assert_close(vd(), reference.value_distances(base, anchors),
                                                 rtol=1e-4, atol=1e-3))
        tw_fn, tw_twin = (lambda: ops.token_weights(base, anchors)), (lambda: torch_token_weights(base, anchors))
        b.add("token_weights", name, ntag, content_bytes + N * T * 4, tw_fn, tw_twin,
              same("token_weights", tw_fn, tw_twin))
        sw_fn, sw_twin = (lambda: ops.segment_weights(base, anchors)), (lambda: torch_segment_weights(base, anchors))
        b.add("segment_weights", name, ntag, content_bytes + N * L * H * D * 4, sw_fn, sw_twin,
              same("segment_weights", sw_fn, sw_twin))
        tw, cw = tw_fn(), sw_fn()
        # base read + out written + N deltas read on layers 1.. (layer 0 gets none).
        off_bytes = 2 * elems * esize + N * (L - 1) * H * T * D * esize
        fo, fo_twin = (lambda: ops.fused_offset(base, deltas, tw, shift, f)), \
            (lambda: torch_fused_offset(base, deltas, tw, shift, f))
        b.add("fused_offset", name, ntag + " keys", off_bytes + tw.numel() * 4, fo, fo_twin,
              same("fused_offset", fo, fo_twin))
        cache = kv(T + 64)
        dst = cache[:, :, 64:64 + T]
        b.add("fused_offset_into", name, ntag + " values slice", off_bytes + cw.numel() * 4,
              lambda: ops.fused_offset_into(dst, base, deltas, cw, shift, None),
              lambda: dst.copy_(torch_fused_offset(base, deltas, cw, shift, None)),
              lambda: check("fused_offset_into", into(dst, base, deltas, cw, shift),
                            torch_fused_offset(base, deltas, cw, shift, None), dtype))
        del base, anchors, deltas, cache, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()


def estimate_rows(b: Bench, case: dict, T: int, N: int, S: int, gen) -> None:
    """AnchorPool.estimate of one slot (placeholder of T tokens + a segment of S)
    against the plain-torch sequence and the kvcomm op-by-op sequence."""
    device, dtype = b.device, case["dtype"]
    L, H, D = case["layers"], case["heads"], case["dim"]
    esize = torch.finfo(dtype).bits // 8

    def kv(tokens, scale=1.0):
        return (torch.randn(L, H, tokens, D, generator=gen) * scale).to(device=device, dtype=dtype)

    pool = kvcomm.AnchorPool(kvcomm.PoolConfig())
    s = dict(base_k=kv(T), base_v=kv(T), seg_k=kv(S), seg_v=kv(S), inv_freq=inv_freq(D, device),
             shift=torch.tensor(700, device=device), seg_shift=torch.tensor(700 + T, device=device),
             anchors=[])
    for u in range(N):
        a = dict(base_k=kv(T), base_v=kv(T), ph_k=kv(T, 0.05), ph_v=kv(T, 0.05), seg_k=kv(S, 0.05),
                 seg_v=kv(S, 0.05))
        aid = pool.add_anchor("slot", a["base_k"], a["base_v"])
        pool.record_deltas("slot", aid, "agent", a["ph_k"], a["ph_v"], a["seg_k"], a["seg_v"])
        s["anchors"].append(a)
    cache_k, cache_v = kv(T + S + 64), kv(T + S + 64)
    s.update(dst_k=cache_k[:, :, 32:32 + T], dst_v=cache_v[:, :, 32:32 + T],
             seg_dst_k=cache_k[:, :, 32 + T:32 + T + S], seg_dst_v=cache_v[:, :, 32 + T:32 + T + S])

    def run_pool():
        used = pool.estimate("slot", "agent", s["base_k"], s["base_v"], s["inv_freq"], 700, s["dst_k"],
                             s["dst_v"], s["seg_k"], s["seg_v"], 700 + T, s["seg_dst_k"], s["seg_dst_v"])
        assert len(used.anchors) == N

    def outputs():
        return tuple(s[k].clone() for k in ("dst_k", "dst_v", "seg_dst_k", "seg_dst_v"))

    def same():
        run_pool()
        got = outputs()
        torch_estimate(s)
        check("estimate", got, outputs(), dtype)

    # Reads: content K/V, N anchors' bases K/V (once: both weights come from
    # one pass), placeholder deltas on layers 1..; segment template K/V and
    # deltas on layers 1..; writes: the four destinations.
    ph = L * H * T * D * esize
    sg = L * H * S * D * esize
    nbytes = 2 * ph + 2 * N * ph + 2 * N * ph * (L - 1) // L + 2 * sg + 2 * N * sg * (L - 1) // L + 2 * ph + 2 * sg
    b.add("estimate", case["name"], f"L{L} H{H} T{T} S{S} D{D} {case['dtype_name']} N{N}", nbytes, run_pool,
          lambda: torch_estimate(s), same, extra=("ops_sequence", lambda: ops_estimate(s)))


def cases_for(args) -> list[dict]:
    custom = any(getattr(args, k) is not None for k in ("layers", "heads", "dim", "tokens", "anchors"))
    cpu = args.device == "cpu"
    if args.quick:
        presets = [dict(name="quick", layers=4, heads=2, dim=64, dtype="fp32", tokens=[64, 129], anchors=[2, 5])]
    elif not cpu or (custom and not args.case):
        presets = [dict(name="custom" if custom else "llama3.1-8b", layers=32, heads=8, dim=128,
                        dtype=args.dtype or "bf16", tokens=[512, 1024, 3072], anchors=[4, 20])]
    else:
        presets = [dict(name="smollm2-135m", layers=30, heads=3, dim=64, dtype=args.dtype or "fp32",
                        tokens=[1024], anchors=[4]),
                   dict(name="llama3.1-8b", layers=32, heads=8, dim=128, dtype=args.dtype or "bf16",
                        tokens=[1024], anchors=[4, 20])]
    for p in presets:
        for k in ("layers", "heads", "dim", "tokens", "anchors"):
            if getattr(args, k) is not None:
                p[k] = getattr(args, k)
        if args.dtype:
            p["dtype"] = args.dtype
        p["dtype_name"], p["dtype"] = p["dtype"], DTYPES[p["dtype"]]
    if args.case:
        presets = [p for p in presets if p["name"] in args.case]
    return presets


def run(args, made: provenance.Provenance) -> dict:
    """The rows and targets of one run; `made`: its provenance, captured before it."""
    device = torch.device(args.device)
    timer = Timer(device, args.warmup, args.iters)
    name = device_name(device)
    peak, source = peak_for(name)
    cases = cases_for(args)
    thread_counts = args.threads if device.type == "cpu" else [None]
    rows, copies, loads = [], {}, {}
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
        copy_gbps = measured_copy_gbps(device, timer)
        copies[str(threads or "device")] = round(copy_gbps, 2)
        if device.type == "cpu":
            loads[str(threads)] = provenance.load_1m()
        print(f"-- {f'{threads} thread(s), ' if threads else ''}copy {copy_gbps:.1f} GB/s", flush=True)
        b = Bench(device, timer, copy_gbps, peak, threads)
        gen = torch.Generator(device="cpu").manual_seed(0)
        for case in cases:
            for T in case["tokens"]:
                op_rows(b, case, T, gen)
                for N in sorted({min(case["anchors"])} | set(args.estimate_anchors or [])):
                    estimate_rows(b, case, T, N, args.segment, gen)
        for N in sorted({n for c in cases for n in c["anchors"]}):
            d = torch.rand(N, generator=gen).to(device) * 3
            md = lambda: ops.match_decide(d)  # noqa: E731
            twin = lambda: torch_match_decide(d)  # noqa: E731
            b.add("match_decide", "", f"N{N}", 2 * N * 4 + 2 * N + 8, md, twin,
                  lambda: check("match_decide", md(), twin(), torch.float32))
        rows += b.rows
    torch.set_num_threads(args.threads[-1] if device.type == "cpu" else torch.get_num_threads())
    result = dict(device=name, cpu_model=cpu_model() if device.type == "cpu" else None,
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), peak_gbps=peak,
                  peak_source=source, copy_gbps=copies, copy_load_avg_1m=loads or None,
                  git_sha=made.marked_sha, command=made.command,
                  quick=args.quick, segment_tokens=args.segment, rows=rows)
    result["targets"] = targets(result)
    return result


def targets(result: dict) -> list[dict]:
    """The acceptance bars, evaluated on these rows."""
    out = []
    rows = result["rows"]
    if result["device"] != "cpu":
        def tokens(r):
            m = re.search(r"T(\d+)", r["shape"])
            return int(m.group(1)) if m else 0

        for r in rows:
            if r["op"] in ("fused_offset", "fused_offset_into", "rope_move", "rope_move_") and tokens(r) >= 1024:
                out.append(dict(target=f"{r['op']} {r['shape']}: >= 70% of peak",
                                value=r["fraction_of_peak"], met=r["fraction_of_peak"] >= 0.7))
            if r["op"] == "value_distances" and " N20" in r["shape"] and tokens(r) == 1024:
                out.append(dict(target=f"matching {r['shape']}: < 1 ms", value=r["ms"], met=r["ms"] < 1.0))
            if r["op"] != "estimate":
                out.append(dict(target=f"{r['op']} {r['shape']}: >= 5x plain torch",
                                value=r["speedup_vs_torch"], met=r["speedup_vs_torch"] >= 5.0))
        return out
    by_key = {(r["op"], r["shape"], r["threads"]): r for r in rows}
    for r in rows:
        where = f"{r['op']} {r['shape']} at {r['threads']} thread(s)"
        if r["op"] == "estimate":
            out.append(dict(target=f"{where}: >= 2x the plain-torch sequence",
                            value=r["speedup_vs_torch"], met=r["speedup_vs_torch"] >= 2.0))
        else:
            out.append(dict(target=f"{where}: >= 1.0x plain torch", value=r["speedup_vs_torch"],
                            met=r["speedup_vs_torch"] >= 1.0))
        if r["op"] in STREAMING and r["threads"] == 1:
            out.append(dict(target=f"{where}: >= 50% of the copy bandwidth", value=r["fraction_of_copy"],
                            met=r["fraction_of_copy"] >= 0.5))
        two = by_key.get((r["op"], r["shape"], 2))
        if r["threads"] == 1 and two and r["op"] != "match_decide":
            scale = r["ms"] / two["ms"]
            out.append(dict(target=f"{r['op']} {r['shape']}: 2 threads >= 1.6x faster than 1",
                            value=round(scale, 2), met=scale >= 1.6))
    return out


def markdown(result: dict, json_path: str) -> str:
    cpu = result["device"] == "cpu"
    head = f"{result['device']}" + (f" ({result['cpu_model']}, ATen CPU capability "
                                     f"{result['cpu_capability']})" if cpu else "")
    copies = ", ".join(f"{k} thread(s) {v:.1f} GB/s" if cpu else f"{v:.0f} GB/s"
                       for k, v in result["copy_gbps"].items())
    lines = [f"<!-- ops:{slug(result['device'])} -->", f"### {head}", "",
             f"`{result['command']}` (git `{result['git_sha'][:12]}`). Raw rows: `{json_path}`. "
             f"Memory copy measured in the same run: {copies}."]
    if not cpu:
        lines[-1] += f" Peak {result['peak_gbps']:.0f} GB/s ({result['peak_source']})."
    lines += ["", "| op | shape | threads | ms | GB/s | of copy | torch ms | vs torch |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        extra = f" (op sequence {r['ops_sequence_ms']:.3f} ms)" if "ops_sequence_ms" in r else ""
        lines.append(f"| {r['op']} | {r['shape']} | {r['threads'] or '-'} | {r['ms']:.3f}{extra} | "
                     f"{r['gbps']:.1f} | {r['fraction_of_copy']:.0%} | {r['torch_ms']:.3f} | "
                     f"{r['speedup_vs_torch']:.2f}x |")
    missed = [t for t in result["targets"] if not t["met"]]
    lines += ["", f"Targets: {len(result['targets']) - len(missed)} of {len(result['targets'])} met."]
    lines += [f"- missed: {t['target']} (got {t['value']})" for t in missed]
    lines.append(f"<!-- /ops:{slug(result['device'])} -->")
    return "\n".join(lines) + "\n"


def write_section(path: Path, block: str) -> None:
    """Replace this device's block inside the Op benchmarks section (adding the
    section or the block when missing), leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin = block.split("\n", 1)[0]
    end = block.rstrip("\n").rsplit("\n", 1)[1]
    if begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + block.rstrip("\n") + text[j:]
    elif SECTION + "\n" in text:
        start = text.index(SECTION + "\n")
        nxt = text.find("\n## ", start + len(SECTION))
        cut = nxt + 1 if nxt >= 0 else len(text)
        text = text[:cut].rstrip("\n") + "\n\n" + block + ("\n" + text[cut:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--case", nargs="+", help="only these default cases (smollm2-135m, llama3.1-8b)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="override every case's dtype")
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--anchors", type=int, nargs="+")
    p.add_argument("--estimate-anchors", type=int, nargs="+",
                   help="anchor counts for the slot estimate (default: the case's smallest)")
    p.add_argument("--segment", type=int, default=32, help="tokens of the segment after the slot")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts")
    p.add_argument("--warmup", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--out", help="JSON path (default results/ops/ops-<device>.json)")
    p.add_argument("--md", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="markdown file to update ('' to leave docs alone)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else (5 if args.device == "cuda" else 2)
    if args.iters is None:
        args.iters = 3 if args.quick else (20 if args.device == "cuda" else 7)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu")
    result = run(args, provenance.capture("python", "benchmarks/ops.py", argv=argv))
    out = Path(args.out) if args.out else ROOT / "results" / "ops" / f"ops-{slug(result['device'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        shown = out.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(out)
    if args.md:
        write_section(Path(args.md), markdown(result, shown))
    met = sum(t["met"] for t in result["targets"])
    print(f"wrote {out}{' and ' + args.md if args.md else ''}; targets met: {met}/{len(result['targets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
