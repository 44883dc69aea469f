"""`kvcomm serve` against plain vLLM in one server, one run: streamed time to first token per
agent, throughput with several conversations in flight, memory, lost and failed requests.

    build/venv-vllm/bin/python benchmarks/vllm_serve.py --dtype float32
    build/venv-vllm/bin/python benchmarks/vllm_serve.py --dtype bfloat16

One server (`kvcomm.vllm.launch.Server`: the supervisor, the connector and the front end,
its KV cache and pool sized by the flags) serves both modes: plain requests (no KVCOMM
parameters: vLLM with its prefix cache, the baseline a user would run) and KVCOMM calls, on
the same prompts, interleaved question by question. Prompts are market reports of 13 shops
(3-agent graph, ~850 tokens) or 26 shops (5-agent graph, ~1650 tokens) with a question about
one shop (kvcomm_app.bench.shop_questions); every conversation has new reports. The pool
learns throughout (as a running service does), after `--warmup` conversations per graph.
Results go to results/vllm/serve.json under the dtype (the other dtype's entry is kept).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import threading
import time

from kvcomm_app import provenance
from kvcomm_app.bench.shop_questions import report
from kvcomm_app.runtime.fidelity import bootstrap_interval

GRAPHS = {
    "3-agents": (13, [
        ("analyst", "You are a careful analyst. Answer briefly.",
         "Read the report and answer the question.\nReport and question:\n{user_question}\nAnswer with one number."),
        ("checker", "You double-check facts in reports.",
         "Check the report before answering.\nReport and question:\n{user_question}\nGive only the answer."),
        ("judge", "You pick the right answer.",
         "Report and question:\n{user_question}\nFirst answer:\n{agent_analyst_current}\nSecond answer:\n"
         "{agent_checker_current}\n\nWhich answer is right? Reply with the number.")]),
    "5-agents": (26, [
        ("reader", "You read reports closely.",
         "Read the report and answer the question.\nReport and question:\n{user_question}\nAnswer with one number."),
        ("auditor", "You audit shop numbers.",
         "Audit the numbers in this report.\nReport and question:\n{user_question}\nGive only the answer."),
        ("critic", "You check answers.",
         "Report and question:\n{user_question}\nProposed answer:\n{agent_reader_current}\n\nIs it correct? "
         "Explain briefly."),
        ("compare", "You compare two answers.",
         "Report and question:\n{user_question}\nFirst:\n{agent_reader_current}\nSecond:\n"
         "{agent_auditor_current}\n\nDo they agree?"),
        ("decider", "You give the final answer.",
         "Report and question:\n{user_question}\nReview:\n{agent_critic_current}\nComparison:\n"
         "{agent_compare_current}\n\nGive the final number only.")]),
}


def run_graph(client, agents, q: str, mode: str, tokens: int):
    """One conversation: every agent in order, each reading the earlier replies its template names."""
    from kvcomm.vllm.client import RemoteEngine
    eng = RemoteEngine(client, stream=True)
    eng.new_request()
    replies, out = {}, []
    for name, _, template in agents:
        inputs = {"user_question": q}
        inputs.update({f"agent_{a}_current": t for a, t in replies.items() if f"{{agent_{a}_current}}" in template})
        c = eng.call(name, inputs, mode=mode, max_new_tokens=tokens)
        replies[name] = c.text   # as a framework passes it on: untrimmed
        out.append(c)
    return out


class _Memory:
    """Memory of a process tree (the supervisor, vLLM's API server, engine core and workers),
    sampled twice a second as PSS: shared pages (the torch libraries every process maps) are
    split between the processes instead of counted once per process as RSS counts them."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self.by_process: dict[str, dict] = {}   # process name -> PSS at start and at its peak
        self.start = self.sample()
        for v in self.by_process.values():
            v["at_start_bytes"] = v["peak_bytes"]
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _tree(self, pid: int) -> list[int]:
        out = [pid]
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [p for c in f.read().split() for p in self._tree(int(c))]
        except OSError:
            pass
        return out

    def sample(self) -> int:
        total = 0
        for p in self._tree(self.pid):
            try:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    pss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))
                with open(f"/proc/{p}/comm") as f:
                    name = f"{f.read().strip()} ({p})"
            except (OSError, StopIteration):
                continue
            total += pss
            d = self.by_process.setdefault(name, {"at_start_bytes": 0, "peak_bytes": 0})
            d["peak_bytes"] = max(d["peak_bytes"], pss)
        return total

    def _run(self):
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, self.start)


def measure_graph(client, agents, shops: int, args, seed: int, log) -> dict:
    lost = failed = 0
    for a in agents:
        client.add_agent(*a)
    for i in range(args.warmup):   # both modes: the pool learns; vLLM's prefix cache holds each S0
        for mode in ("dense", "kvcomm"):
            run_graph(client, agents, report(seed + i, shops), mode, args.tokens)
    per = {a[0]: {"plain_ms": [], "kvcomm_ms": [], "pairs": [], "paths": {}, "prompt_tokens": []} for a in agents}
    for i in range(args.questions):
        q = report(seed + 100 + i, shops)
        ttft = {}
        for mode in ("dense", "kvcomm"):
            try:
                calls = run_graph(client, agents, q, mode, args.tokens)
            except Exception as e:
                failed += 1
                log(f"failed ({mode}): {e!r}")
                continue
            for c in calls:
                d = per[c.agent]
                d["plain_ms" if mode == "dense" else "kvcomm_ms"].append(c.ttft_ms)
                ttft[(c.agent, mode)] = c.ttft_ms
                if mode == "kvcomm":
                    d["paths"][c.path] = d["paths"].get(c.path, 0) + 1
                    d["prompt_tokens"].append(c.prompt_tokens)
                    lost += c.new_tokens == 0
        for name, d in per.items():   # one question's two calls: the same prompt in both modes
            if (name, "dense") in ttft and (name, "kvcomm") in ttft:
                d["pairs"].append([(ttft[(name, "dense")], ttft[(name, "kvcomm")])])
    out = {}
    for name, d in per.items():
        pm, km = statistics.median(d["plain_ms"]), statistics.median(d["kvcomm_ms"])
        ci = bootstrap_interval(d["pairs"], _speedup)
        out[name] = {"plain_ms_median": round(pm, 1), "kvcomm_ms_median": round(km, 1), "speedup": round(pm / km, 3),
                     "speedup_ci95": ci and [round(x, 3) for x in ci],
                     "paths": d["paths"], "prompt_tokens_median": statistics.median(d["prompt_tokens"]),
                     "plain_ms": [round(x, 1) for x in d["plain_ms"]], "kvcomm_ms": [round(x, 1) for x in d["kvcomm_ms"]]}
        log(f"{name}: plain {pm:.0f} ms, kvcomm {km:.0f} ms ({pm / km:.2f}x, 95% CI {ci and [round(x, 2) for x in ci]}), "
            f"paths {d['paths']}, prompt {statistics.median(d['prompt_tokens'])} tokens")
    return {"per_agent": out, "lost_requests": lost, "errored_requests": failed}


def _speedup(pairs: list) -> float:
    """Median plain TTFT over median KVCOMM TTFT of (plain, kvcomm) pairs."""
    return statistics.median(p for p, _ in pairs) / statistics.median(k for _, k in pairs)


def throughput(client, agents, shops: int, args, seed: int, log) -> dict:
    out = {}
    for n in args.in_flight:
        out[str(n)] = {}
        for mode in ("dense", "kvcomm"):
            qs = [report(seed + 1000 * n + i, shops) for i in range(2 * n)]
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(max_workers=n) as ex:
                res = list(ex.map(lambda q: _safe(run_graph, client, agents, q, mode, args.tokens), qs))
            wall = time.perf_counter() - t0
            ok = [g for g in res if not isinstance(g, Exception)]
            calls = sum(len(g) for g in ok)
            out[str(n)]["plain" if mode == "dense" else "kvcomm"] = {
                "calls_per_s": round(calls / wall, 4), "calls": calls, "wall_s": round(wall, 1),
                "errored_conversations": len(res) - len(ok)}
        p, k = out[str(n)]["plain"]["calls_per_s"], out[str(n)]["kvcomm"]["calls_per_s"]
        out[str(n)]["ratio"] = round(k / p, 3)
        log(f"{n} conversations in flight: plain {p:.3f} calls/s, kvcomm {k:.3f} calls/s ({k / p:.2f}x)")
    return out


def _safe(fn, *a):
    try:
        return fn(*a)
    except Exception as e:
        return e


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--questions", type=int, default=6, help="measured conversations per graph")
    p.add_argument("--warmup", type=int, default=5, help="conversations per graph before measuring")
    p.add_argument("--tokens", type=int, default=16, help="generated tokens per call")
    p.add_argument("--in-flight", type=int, nargs="*", default=[4, 8], help="conversations at a time (throughput)")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--pool-gib", type=float, default=1.0, help="the anchor pool's byte budget")
    p.add_argument("--graphs", nargs="*", default=list(GRAPHS))
    p.add_argument("--out", default="results/vllm/serve.json")
    p.add_argument("--log", default="/tmp/kvcomm-serve-bench.log", help="the server's log")
    args = p.parse_args(argv)
    from kvcomm.models import embedded_model_dir
    from kvcomm.vllm.launch import Server
    made = provenance.capture("python", "benchmarks/vllm_serve.py", argv=argv)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)
    model = embedded_model_dir()
    gib = 1 << 30
    kv, pool_bytes = int(args.kv_cache_gib * gib), int(args.pool_gib * gib)
    model_bytes = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors"))
    run = {"dtype": args.dtype, "kv_cache_bytes": kv, "pool_byte_budget": pool_bytes, "tokens_per_call": args.tokens,
           "warmup_conversations": args.warmup, "measured_conversations": args.questions, "graphs": {},
           "device_detail": provenance.device_detail("cpu", args.dtype), "load_average": provenance.load_average(),
           **made.fields()}
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(model, args.log, served_model_name="SmolLM2-135M-Instruct", dtype=args.dtype,
                        max_model_len=4096, kv_cache_bytes=kv, pool={"byte_budget": pool_bytes},
                        pool_file=os.path.join(tmp, "pool.bin"), pool_new=True,
                        extra_args=["--max-num-seqs", "16"])
        with server as client:
            log(f"server up in {server.startup_s:.0f} s")
            mem = _Memory(server.proc.pid)
            for gi, name in enumerate(args.graphs):
                shops, agents = GRAPHS[name]
                log(f"{name}: {args.warmup} warm-up + {args.questions} measured conversations per mode")
                run["graphs"][name] = measure_graph(client, agents, shops, args, 10_000 * (gi + 1), log)
            shops, agents = GRAPHS[args.graphs[0]]
            run["throughput_" + args.graphs[0]] = throughput(client, agents, shops, args, 50_000, log)
            peak = mem.stop()
    # What the configuration allows: the server as it started (weights, the preallocated KV
    # cache, the processes themselves), plus the pool's byte budget, the conversation state's
    # (1 GiB sessions, 256 MiB template shapes: the defaults) and 512 MiB for transient buffers
    # (staged KV, read-backs); and the reserve kvcomm serve sizes the KV cache with.
    budget = mem.start + pool_bytes + (1 << 30) + (256 << 20) + gib // 2   # + sessions, template shapes
    run["memory"] = {"measure": "PSS of the server's process tree", "at_start_bytes": mem.start,
                     "peak_bytes": peak, "budget_bytes": budget, "within_budget": peak <= budget,
                     "by_process": mem.by_process,
                     "serve_sizing_reserve_bytes": 2 * model_bytes + kv + pool_bytes + 2 * gib}
    run["load_average_end"] = provenance.load_average()
    run["wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"memory (PSS) {mem.start / gib:.2f} GiB at start, peak {peak / gib:.2f} GiB of a {budget / gib:.2f} GiB "
        f"budget; {run['wall_s']} s")
    for name, d in sorted(mem.by_process.items(), key=lambda x: -x[1]["peak_bytes"]):
        log(f"  {name}: {d['at_start_bytes'] / gib:.2f} GiB at start, peak {d['peak_bytes'] / gib:.2f} GiB")
    doc = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    doc.setdefault("runs", {})[args.dtype] = run
    doc["what"] = ("kvcomm serve vs plain vLLM (prefix caching on) in the same server and run: streamed TTFT "
                   "per agent (median over measured conversations), throughput with N conversations in flight, "
                   "peak memory (PSS) of the server's processes; SmolLM2-135M-Instruct on this machine's CPU")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
