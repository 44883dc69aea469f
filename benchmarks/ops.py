"""Op-level benchmark of torch.ops.kvcomm against the same computation in plain torch.

For every op on 8B-model shapes (32 layers, 8 KV heads, head_dim 128; 512, 1024
and 3072 tokens; 4 and 20 anchors; bf16): the time per call, the bytes the op
must move at minimum (each input read once, each output written once), the
achieved GB/s and its fraction of the device's peak memory bandwidth, and the
same computation written with plain torch ops, timed in the same run. Each
kvcomm result is checked against its torch twin before it is timed, so a fast
wrong kernel cannot post a number.

On a GPU the timing is with CUDA events, after warm-up, per call with the L2
cache flushed before each (a 50 MB L2 would otherwise hold the 512-token
inputs), median over --iters calls. On the CPU (`--device cpu`, with `--quick`
for small sizes) it is wall time; CPU numbers smoke-test the script and are
not GPU claims.

    python benchmarks/ops.py                      # GPU, full sizes
    python benchmarks/ops.py --device cpu --quick --out /tmp/ops.json --md /tmp/b.md

Writes results/ops-<device>.json (rows: op, shape, ms, bytes, gbps,
fraction_of_peak, torch_ms, speedup_vs_torch; top level: device, peak_gbps,
peak_source, copy_gbps, git_sha, command, targets) and the "Op benchmarks"
section of docs/benchmarks.md (other sections are left alone).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import kvcomm  # noqa: F401  (registers torch.ops.kvcomm)
from kvcomm import ops

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
    return torch.stack([torch.linalg.vector_norm((content - a[:, :, :n]).float()) for a in anchors])


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


# ---- timing -----------------------------------------------------------------

class Timer:
    def __init__(self, device: torch.device, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.cuda = device.type == "cuda"
        # Bigger than any L2 (H100: 50 MB, H200: 60 MB, B200: 126 MB).
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None

    def ms(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.cuda:
            torch.cuda.synchronize()
            for _ in range(self.iters):
                self.flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def measured_copy_gbps(device: torch.device, timer: Timer) -> float:
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_for(name: str):
    for pattern, gbps in PEAK_GBPS:
        if pattern.lower() in name.lower():
            return gbps, f"data sheet ({pattern})"
    return None, None


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- the benchmark ------------------------------------------------------------

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


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    esize = torch.finfo(dtype).bits // 8
    timer = Timer(device, args.warmup, args.iters)
    name = device_name(device)
    copy_gbps = measured_copy_gbps(device, timer)
    peak, source = peak_for(name)
    if peak is None:
        peak, source = copy_gbps, "measured: a large memory copy"
    L, H, D = args.layers, args.heads, args.dim
    f = inv_freq(D, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []

    def kv(T, scale=1.0):
        return (torch.randn(L, H, T, D, generator=gen) * scale).to(device=device, dtype=dtype)

    def add(op, shape, nbytes, fn, twin, check_fn=None):
        got, want = fn(), twin()
        (check_fn or (lambda: check(op, got, want, dtype)))()
        ms, tms = timer.ms(fn), timer.ms(twin)
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(op=op, shape=shape, ms=round(ms, 4), bytes=int(nbytes), gbps=round(gbps, 1),
                         fraction_of_peak=round(gbps / peak, 3), torch_ms=round(tms, 4),
                         speedup_vs_torch=round(tms / ms, 2)))
        print(f"{op:18s} {shape:34s} {ms:9.4f} ms {gbps:8.1f} GB/s {gbps / peak:6.1%} of peak | "
              f"torch {tms:9.4f} ms  x{tms / ms:.1f}", flush=True)

    for T in args.tokens:
        elems = L * H * T * D
        tag = f"L{L} H{H} T{T} D{D} {args.dtype}"
        keys = kv(T)
        shift = torch.tensor(T + 17, device=device)
        add("rope_move", tag, 2 * elems * esize, lambda: ops.rope_move(keys, f, shift),
            lambda: torch_rope(keys, f, shift))
        buf = kv(T + 64)
        view = buf[:, :, 32:32 + T]  # a slice of a [L, H, Tmax, D] cache buffer
        add("rope_move_", tag + " slice", 2 * elems * esize, lambda: ops.rope_move_(view, f, shift),
            lambda: view.copy_(torch_rope(view, f, shift)), check_fn=lambda: None)
        del buf, view
        for N in args.anchors:
            ntag = f"{tag} N{N}"
            base = kv(T)
            anchors = [kv(T + 3 * u, 1.0) for u in range(N)]
            deltas = [kv(T, 0.05) for _ in range(N)]
            content_bytes = (N + 1) * elems * esize  # content + the first T tokens of N anchors
            add("value_distances", ntag, content_bytes, lambda: ops.value_distances(base, anchors),
                lambda: torch_value_distances(base, anchors),
                check_fn=lambda: torch.testing.assert_close(
                    ops.value_distances(base, anchors), torch_value_distances(base, anchors),
                    rtol=1e-3, atol=1e-3))
            add("token_weights", ntag, content_bytes + N * T * 4,
                lambda: ops.token_weights(base, anchors), lambda: torch_token_weights(base, anchors))
            add("segment_weights", ntag, content_bytes + N * L * H * D * 4,
                lambda: ops.segment_weights(base, anchors), lambda: torch_segment_weights(base, anchors))
            tw = ops.token_weights(base, anchors)
            cw = ops.segment_weights(base, anchors)
            # base read + out written + N deltas read on layers 1.. (layer 0 gets none).
            off_bytes = 2 * elems * esize + N * (L - 1) * H * T * D * esize
            add("fused_offset", ntag + " keys", off_bytes + tw.numel() * 4,
                lambda: ops.fused_offset(base, deltas, tw, shift, f),
                lambda: torch_fused_offset(base, deltas, tw, shift, f))
            cache = kv(T + 64)
            dst = cache[:, :, 64:64 + T]
            add("fused_offset_into", ntag + " values slice", off_bytes + cw.numel() * 4,
                lambda: ops.fused_offset_into(dst, base, deltas, cw, shift, None),
                lambda: dst.copy_(torch_fused_offset(base, deltas, cw, shift, None)),
                check_fn=lambda: check("fused_offset_into", ops.fused_offset_into(
                    dst, base, deltas, cw, shift, None).clone(),
                    torch_fused_offset(base, deltas, cw, shift, None), dtype))
            del base, anchors, deltas, cache, dst
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for N in args.anchors:
        d = torch.rand(N, generator=gen).to(device) * 3
        add("match_decide", f"N{N}", 2 * N * 4 + 2 * N + 8, lambda: ops.match_decide(d),
            lambda: torch_match_decide(d))

    return dict(device=name, peak_gbps=peak, peak_source=source, copy_gbps=round(copy_gbps, 1),
                dtype=args.dtype, git_sha=git_sha(),
                command=" ".join(["python"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                quick=args.quick, rows=rows, targets=targets(rows))


def targets(rows) -> list[dict]:
    """The issue's acceptance bars, evaluated on these rows."""
    out = []

    def tokens(r):
        return int(re.search(r"T(\d+)", r["shape"]).group(1)) if "T" in r["shape"] else 0

    for r in rows:
        if r["op"] in ("fused_offset", "fused_offset_into", "rope_move", "rope_move_") and tokens(r) >= 1024:
            out.append(dict(target=f"{r['op']} {r['shape']}: >= 70% of peak",
                            value=r["fraction_of_peak"], met=r["fraction_of_peak"] >= 0.7))
        if r["op"] == "value_distances" and " N20" in r["shape"] and tokens(r) == 1024:
            out.append(dict(target=f"matching {r['shape']}: < 1 ms", value=r["ms"], met=r["ms"] < 1.0))
        out.append(dict(target=f"{r['op']} {r['shape']}: >= 5x plain torch",
                        value=r["speedup_vs_torch"], met=r["speedup_vs_torch"] >= 5.0))
    return out


def markdown(result: dict, json_path: str) -> str:
    lines = [SECTION, "",
             f"`{result['command']}` on **{result['device']}** (git `{result['git_sha'][:12]}`), "
             f"{result['dtype']}. Peak {result['peak_gbps']:.0f} GB/s ({result['peak_source']}); "
             f"a large memory copy measured {result['copy_gbps']:.0f} GB/s. Bytes = the minimum the "
             "op must move (inputs read once, outputs written once; layer 0 reads no deltas). "
             "`torch` = the same computation in plain torch ops, same run. Raw rows: "
             f"`{json_path}`.", ""]
    if result["device"] == "cpu" or result["quick"]:
        lines += ["*CPU / --quick run: a smoke test of the script, not a GPU measurement.*", ""]
    lines += ["| op | shape | ms | GB/s | of peak | torch ms | speedup |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['shape']} | {r['ms']:.4f} | {r['gbps']:.1f} | "
                     f"{r['fraction_of_peak']:.1%} | {r['torch_ms']:.4f} | {r['speedup_vs_torch']:.1f}x |")
    missed = [t for t in result["targets"] if not t["met"]]
    lines += ["", f"Targets: {len(result['targets']) - len(missed)} of {len(result['targets'])} met."]
    lines += [f"- missed: {t['target']} (got {t['value']})" for t in missed]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the Op benchmarks section, leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        rest = text[nxt + 1:] if nxt >= 0 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--anchors", type=int, nargs="+")
    p.add_argument("--warmup", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--out", help="JSON path (default results/ops-<device>.json)")
    p.add_argument("--md", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to update")
    args = p.parse_args(argv)
    full = dict(layers=32, heads=8, dim=128, tokens=[512, 1024, 3072], anchors=[4, 20], warmup=5, iters=20)
    quick = dict(layers=4, heads=2, dim=64, tokens=[64, 129], anchors=[2, 5], warmup=1, iters=3)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu --quick")
    result = run(args)
    out = Path(args.out) if args.out else ROOT / "results" / f"ops-{slug(result['device'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        shown = out.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(out)
    write_section(Path(args.md), markdown(result, shown))
    met = sum(t["met"] for t in result["targets"])
    print(f"wrote {out} and {args.md}; targets met: {met}/{len(result['targets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
