"""`kvcomm bench ttft --backend vllm`: KVCOMM inside vLLM on this machine, everything in one run.

1. checks, engine in this process (KVCommLLM, fp32): calls that take the dense path and
   plain requests give the tokens vLLM gives without the connector (`dense_identical`);
   the reuse path's KV written into vLLM's blocks vs KVCommEngine's assembled KV for the
   same prompt and pool (`kv_max_abs_diff_vs_hf`) and first tokens (`first_token_equal_hf`);
2. a KVCOMM server (`python -m kvcomm.vllm.vllm_cli serve` with the connector and front
   end) driven over HTTP by kvcomm.vllm.client with a 3-agent graph (two workers read a
   shared context + question, a judge reads both replies):
   - per-agent time to first token, dense (plain vLLM requests, its prefix cache on)
     vs KVCOMM, interleaved question by question, streamed;
   - throughput (agent calls per second) with 1, 4 and 8 graphs in flight, both modes;
   - the frozen-pool graph run with 4 and 8 graphs in flight vs one at a time
     (outputs equal?) and every request answered (`lost_requests`).
Writes results/vllm/vllm-<device>.json with the command and commit.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time

# absolute: this file also runs as a script (docs/serving.md)
from kvcomm_app import provenance
from kvcomm_app.bench.shop_questions import question

AGENTS = [
    ("analyst", "You are a careful analyst. Answer briefly.",
     "Read the report and answer the question.\nReport and question:\n{user_question}\nAnswer with one number."),
    ("checker", "You double-check facts in reports.",
     "Check the report before answering.\nReport and question:\n{user_question}\nGive only the answer."),
    ("judge", "You pick the right answer.",
     "Report and question:\n{user_question}\nFirst answer:\n{agent_analyst_current}\nSecond answer:\n"
     "{agent_checker_current}\nWhich answer is right? Reply with the number."),
]


def run_graph(client, q: str, mode: str, learn: bool, tokens: int, stream: bool):
    from kvcomm.vllm.client import RemoteEngine
    eng = RemoteEngine(client, stream=stream, learn=learn)
    eng.new_request()
    a = eng.call("analyst", {"user_question": q}, mode=mode, max_new_tokens=tokens)
    b = eng.call("checker", {"user_question": q}, mode=mode, max_new_tokens=tokens)
    c = eng.call("judge", {"user_question": q, "agent_analyst_current": a.text.strip() or "none",
                           "agent_checker_current": b.text.strip() or "none"}, mode=mode, max_new_tokens=tokens)
    return [a, b, c]


def run_many(client, qs, mode, learn, tokens, in_flight, stream=False):
    """(per-graph results or the exception, wall seconds) with `in_flight` graphs at a time."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=in_flight) as ex:
        futs = [ex.submit(run_graph, client, q, mode, learn, tokens, stream) for q in qs]
        out = []
        for f in futs:
            try:
                out.append(f.result())
            except Exception as e:
                out.append(e)
    return out, time.perf_counter() - t0


def texts(results):
    return [None if isinstance(g, Exception) else [c.text for c in g] for g in results]


def checks_phase(model_dir: str, log) -> dict:
    """Part 1 (engine in this process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from kvcomm.models import load_model
    from kvcomm.vllm.offline import KVCommLLM
    from kvcomm_app.bench.vllm_parity import compare_with_engine, run_reference
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    eng = KVCommLLM(model_dir, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0, block_size=32,
                    kv_cache_memory_bytes=1 << 30, keep_loads=True)
    for a in AGENTS:
        eng.add_agent(*a)
    calls = []
    for i in range(6):
        q = question(100 + i)
        a = eng.call("analyst", {"user_question": q}, session=f"w{i}", max_tokens=8)
        b = eng.call("checker", {"user_question": q}, session=f"w{i}", max_tokens=8)
        calls += [a, b]
    plain = [eng.call("analyst", {"user_question": question(100 + i)}, session="plain", max_tokens=8, kvcomm=False)
             for i in range(2)]
    dense = [c for c in calls if c.path == "dense"] + plain
    log(f"checks: {len(dense)} dense-path/plain calls vs vLLM without the connector ...")
    ref = run_reference(model_dir, [c.prompt_ids for c in dense], 8)
    dense_identical = [c.token_ids for c in dense] == ref
    model, tok = load_model(model_dir)
    cmp = compare_with_engine(eng, get_kv_transfer_group(), model, tok, AGENTS, [question(200 + i) for i in range(4)],
                      max_tokens=(12, 12, 6))
    log(f"checks: dense identical {dense_identical}; estimated KV vs HF max abs diff {cmp.kv_max_abs_diff} over "
        f"{len(cmp.estimated_pairs)} calls; first tokens equal {cmp.first_token_equal}")
    return {"dense_identical": dense_identical, "dense_calls_compared": len(dense),
            "kv_max_abs_diff_vs_hf": cmp.kv_max_abs_diff, "first_token_equal_hf": cmp.first_token_equal,
            "hf_comparison": cmp.to_dict()}


def server_phase(model_dir: str, args, log) -> dict:
    from kvcomm.vllm.launch import Server
    server = Server(model_dir, args.server_log, dtype="float32", max_model_len=2048,
                    extra_args=["--enforce-eager", "--block-size", "32", "--uvicorn-log-level", "warning",
                                "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(2 << 30)])
    with server as client:
        log(f"server ready in {server.startup_s:.0f} s")
        for a in AGENTS:
            client.add_agent(*a)
        lost = 0
        warm, _ = run_many(client, [question(300 + i) for i in range(args.warmup)], "kvcomm", True, args.tokens, 1)
        lost += sum(isinstance(g, Exception) for g in warm)
        # TTFT per agent, dense and KVCOMM interleaved question by question (streamed)
        ttft = {a[0]: {"dense": [], "kvcomm": [], "kvcomm_paths": []} for a in AGENTS}
        for i in range(args.questions):
            q = question(i)
            for mode in ("dense", "kvcomm"):
                try:
                    g = run_graph(client, q, mode, False, args.tokens, stream=True)
                except Exception as e:
                    lost += 1
                    log(f"lost: {e!r}")
                    continue
                for c in g:
                    ttft[c.agent][mode].append(c.ttft_ms)
                    if mode == "kvcomm":
                        ttft[c.agent]["kvcomm_paths"].append(c.path)
        per_agent = {}
        for name, d in ttft.items():
            md, mk = statistics.median(d["dense"]), statistics.median(d["kvcomm"])
            per_agent[name] = {"dense_ms_median": md, "kvcomm_ms_median": mk, "speedup": md / mk,
                               "dense_ms": d["dense"], "kvcomm_ms": d["kvcomm"],
                               "kvcomm_reuse": d["kvcomm_paths"].count("reuse"), "calls": len(d["kvcomm"])}
            log(f"TTFT {name}: dense {md:.0f} ms, kvcomm {mk:.0f} ms ({md / mk:.2f}x), reuse "
                f"{d['kvcomm_paths'].count('reuse')}/{len(d['kvcomm'])}")
        # throughput and concurrency: frozen pool, non-streamed (paths from the server)
        qs = [question(i) for i in range(args.questions)]
        seq, _ = run_many(client, qs, "kvcomm", False, args.tokens, 1)
        throughput, equal = {}, {}
        for g in (1, 4, 8):
            throughput[str(g)] = {}
            for mode in ("dense", "kvcomm"):
                res, wall = run_many(client, qs, mode, False, args.tokens, g)
                bad = sum(isinstance(x, Exception) for x in res)
                lost += bad
                n = 3 * (len(res) - bad)
                throughput[str(g)][mode] = {"requests_per_s": n / wall, "calls": n, "wall_s": wall}
                if mode == "kvcomm":
                    equal[str(g)] = texts(res) == texts(seq)
                    reuse = sum(c.path == "reuse" for x in res if not isinstance(x, Exception) for c in x)
                    throughput[str(g)][mode]["reuse_calls"] = reuse
            log(f"throughput {g} graphs: dense {throughput[str(g)]['dense']['requests_per_s']:.2f} req/s, kvcomm "
                f"{throughput[str(g)]['kvcomm']['requests_per_s']:.2f} req/s; outputs equal to sequential: "
                f"{equal[str(g)]}")
        return {"per_agent_ttft": per_agent, "throughput": throughput, "concurrent_graphs": [4, 8],
                "concurrent_equal_sequential": equal, "lost_requests": lost,
                "graph": [a[0] for a in AGENTS], "tokens_per_call": args.tokens, "measured_questions": args.questions,
                "warmup_questions": args.warmup}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a local model folder (default: the embedded SmolLM2)")
    p.add_argument("--questions", type=int, default=8, help="measured questions (>= 8: 8 graphs in flight)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8, help="generated tokens per agent call")
    p.add_argument("--out", default="results/vllm/vllm-cpu.json")
    p.add_argument("--server-log", default="/tmp/kvcomm-vllm-bench-server.log")
    p.add_argument("--skip-checks", action="store_true", help="server part only")
    args = p.parse_args(argv)
    from kvcomm.models import embedded_model_dir
    model_dir = args.model or embedded_model_dir()
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)
    # run as a script (docs/serving.md) or through `kvcomm bench ttft --backend vllm`: either
    # way the command recorded is the script's, which reruns it; `commit` is this file's name
    # for the sha
    made = provenance.capture("python", "python/kvcomm_app/bench/vllm_ttft.py", argv=argv)
    out = {"command": made.command, "commit": made.git_sha, "git_dirty": made.git_dirty,
           "model": model_dir, "device": "cpu", "dtype": "float32"}
    try:
        import vllm
        out["vllm"] = vllm.__version__
    except Exception:
        pass
    if not args.skip_checks:
        out.update(checks_phase(model_dir, log))
    out.update(server_phase(model_dir, args, log))
    out["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
