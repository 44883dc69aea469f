"""The vLLM connector against KVCommEngine on the same calls (the tests and `vllm_ttft` use it).

compare_with_engine: the same agent graph through vLLM with the connector (KVCommLLM,
engine in this process, keep_loads on) and through KVCommEngine on the same weights at the
settings the connector can express (partial="prefix": a partial call estimates only the
slots before the first one it computes; the recompute policy's tail), both with the same
anchor pool (the connector's, saved and loaded into the engine before every call; the
vLLM calls run with learn=False, so neither changes it). The engine is fed vLLM's reply
tokens (reply_ids), so both see identical prompts. Per call: both paths and prefixes, and
where both estimate, the max abs difference between the KV the connector wrote into vLLM's
blocks and the KV the engine assembled (each side computed its exact S0, template segments
and content bases with its own forward passes, so the difference is the two
implementations' float32 rounding), and both first tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from kvcomm_app.runtime.fidelity import bootstrap_interval


@dataclass
class Comparison:
    calls: list = field(default_factory=list)   # per call: agent, paths, prefixes, first tokens, diffs

    @property
    def estimated_pairs(self) -> list:
        """Calls both backends ran on estimated KV (reuse or partial), compared."""
        return [c for c in self.calls if "k_max_abs_diff" in c]

    @property
    def kv_max_abs_diff(self) -> float | None:
        diffs = [max(c["k_max_abs_diff"], c["v_max_abs_diff"]) for c in self.estimated_pairs]
        return max(diffs) if diffs else None

    @property
    def first_token_equal(self) -> float | None:
        pairs = self.estimated_pairs
        return sum(c["first_equal"] for c in pairs) / len(pairs) if pairs else None

    @property
    def comparable(self) -> list:
        """Calls whose contents had the same kinds of bases in both (see _compare's note)."""
        return [c for c in self.calls if "note" not in c]

    @property
    def same_path(self) -> float | None:
        calls = self.comparable
        return sum(c["vllm_path"] == c["hf_path"] for c in calls) / len(calls) if calls else None

    def to_dict(self) -> dict:
        return {"kv_max_abs_diff_vs_hf": self.kv_max_abs_diff, "first_token_equal_hf": self.first_token_equal,
                "same_path": self.same_path, "comparable_calls": len(self.comparable),
                "estimated_pairs": len(self.estimated_pairs), "calls": self.calls}


def graph_inputs(template: str, question: str, replies: dict) -> dict:
    """{user_question} and every earlier agent's reply the template reads."""
    inputs = {"user_question": question}
    inputs.update({f"agent_{a}_current": text for a, text in replies.items() if f"{{agent_{a}_current}}" in template})
    return inputs


def compare_with_engine(offline, connector, hf_model, hf_tokenizer, graph, questions, *, max_tokens=(12, 4),
                        session_prefix="cmp", recompute: str = "none") -> Comparison:
    """graph: [(agent, system, template)] run in order per question; each agent's inputs are
    {user_question} and the earlier agents' replies it reads (graph_inputs)."""
    from kvcomm import AnchorPool
    from kvcomm.engine import KVCommEngine
    out = Comparison()
    hf = KVCommEngine(hf_model, hf_tokenizer, pool=AnchorPool(connector.worker_state.pool.config),
                      partial="prefix", recompute=recompute, defer_first_encoding=offline.defer)
    for name, system, template in graph:
        hf.add_agent(name, system, template)
    with tempfile.TemporaryDirectory() as tmp:
        pool_file = os.path.join(tmp, "pool.bin")
        connector.worker_state.pool.save(pool_file)
        for j, q in enumerate(questions):
            sid = f"{session_prefix}{j}"
            hf.new_request()
            replies: dict[str, str] = {}
            for i, (name, _, template) in enumerate(graph):
                inputs = graph_inputs(template, q, replies)
                budget = max_tokens[min(i, len(max_tokens) - 1)]
                v = offline.call(name, inputs, session=sid, max_tokens=budget, learn=False)
                hf.pool.load(pool_file)
                h = hf.call(name, inputs, max_new_tokens=budget, reply_ids=v.token_ids, keep_cache=True)
                out.calls.append(_compare(j, name, v, h, connector, sid, offline, template, replies))
                replies[name] = v.text.strip() or "none"
    return out


def _compare(j, name, v, h, connector, sid, offline, template, replies) -> dict:
    rec = {"question": j, "agent": name, "vllm_path": v.path, "hf_path": h.path, "vllm_reason": v.reason,
           "hf_reason": h.reason, "vllm_prefix": v.reused_tokens, "hf_prefix": h.prompt_tokens - h.computed_tokens,
           "vllm_first": v.token_ids[0], "hf_first": h.first_token_id, "first_equal": v.token_ids[0] == h.first_token_id}
    # KVCommEngine always captures a reply (it computes the last token's KV with one more
    # forward); the connector captures one only if that token was fed back, and otherwise
    # encodes it behind the reply header: then the two bases differ by design.
    encoded = [a for a in replies if f"{{agent_{a}_current}}" in template and offline.captured(sid, a) is None]
    if encoded:
        rec["note"] = f"reply of {', '.join(encoded)} encoded by vLLM, captured by the HF engine"
    kept = connector.kept.get(v.request_id)
    if kept is None:   # the engine core may suffix request ids
        kept = next((kv for rid, kv in connector.kept.items() if rid.startswith(v.request_id + "-")), None)
    both = v.path == h.path and v.path in ("reuse", "partial")
    if both and kept is not None and not encoded:
        K, V = kept
        n = K.shape[2]
        rec["k_max_abs_diff"] = float((K.float() - h.cache.k[:, :, :n].float()).abs().max())
        rec["v_max_abs_diff"] = float((V.float() - h.cache.v[:, :, :n].float()).abs().max())
    elif both:
        rec["vllm_path"] += " (not compared)"
        rec["hf_path"] += " (not compared)"
    return rec


def run_reference(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy fp32 token ids of `prompts` from vLLM without any connector, in a separate
    process (a second engine in this process would share its distributed state)."""
    code = ("import json, os, sys\n"
            "os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'\n"
            "from vllm import LLM, SamplingParams\n"
            "from vllm.inputs import TokensPrompt\n"
            "a = json.loads(sys.stdin.read())\n"
            "llm = LLM(model=a['model'], dtype='float32', max_model_len=2048, enforce_eager=True, seed=0,"
            " block_size=32, kv_cache_memory_bytes=1 << 30)\n"
            "outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in a['prompts']],"
            " SamplingParams(max_tokens=a['max_tokens'], temperature=0.0), use_tqdm=False)\n"
            "print('RESULT ' + json.dumps([list(o.outputs[0].token_ids) for o in outs]))\n")
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(
        {"model": model_dir, "prompts": prompts, "max_tokens": max_tokens}), capture_output=True, text=True,
        env=env, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"reference run failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------- the parity benchmark
#
# python benchmarks/vllm_parity.py [--warmup 5] [--questions 8] [--max-tokens 48]
# (in the vLLM environment: build/venv-vllm). Every call runs three ways on identical prompts
# (the vLLM reply's tokens are fed to both engines as reply_ids), each learning its own pool
# from empty: the server's connector, KVCommEngine at the settings the connector can express
# (partial="prefix"), and KVCommEngine at its defaults (partial calls estimate any slot).
# Reported per graph over the measured questions: the share of prompt tokens after each
# agent's S0 that each one did not compute (encodings beside: content tokens encoded behind a
# header), path agreement, and a same-pool check (compare_with_engine) on a few questions.
# Questions: short shop reports with a question (kvcomm_app.bench.shop_questions.question, ~120
# tokens, different numbers each), so contents of similar length meet the pools' anchors.

SOLVE = ("solver", "You are a careful math tutor.",
         "Solve this problem step by step.\nProblem:\n{user_question}\nEnd with the final number.")
CRITIC = ("critic", "You check solutions.",
          "Problem:\n{user_question}\nProposed solution:\n{agent_solver_current}\nIs it correct? Explain briefly.")
JUDGE = ("judge", "You give the final answer.",
         "Problem:\n{user_question}\nSolution:\n{agent_solver_current}\nReview:\n{agent_critic_current}\n"
         "Give the final number only.")
ALT = ("alt", "You solve problems another way.",
       "Find the answer by another method.\nProblem:\n{user_question}\nEnd with the final number.")
COMPARE = ("compare", "You compare two solutions.",
           "Problem:\n{user_question}\nFirst:\n{agent_solver_current}\nSecond:\n{agent_alt_current}\n"
           "Do they agree?")
JUDGE5 = ("judge5", "You give the final answer.",
          "Problem:\n{user_question}\nReview:\n{agent_critic_current}\nComparison:\n{agent_compare_current}\n"
          "Give the final number only.")
GRAPHS = {"3-agents": [SOLVE, CRITIC, JUDGE], "5-agents": [SOLVE, ALT, CRITIC, COMPARE, JUDGE5]}


def _share(calls: list, key: str) -> float | None:
    after = sum(c["after_s0"] for c in calls)
    return sum(c[key] for c in calls) / after if after else None


def _bootstrap(calls: list, key: str) -> list | None:
    """95% interval of _share over questions (one question's calls decide together)."""
    by_q: dict = {}
    for c in calls:
        by_q.setdefault(c["question"], []).append(c)
    return bootstrap_interval(list(by_q.values()), lambda sample: _share(sample, key) or 0.0)


def _summary(calls: list, backend: str) -> dict:
    mine = [dict(c[backend], question=c["question"]) for c in calls]
    paths: dict = {}
    for c in mine:
        paths[c["path"]] = paths.get(c["path"], 0) + 1
    out = {"calls": len(mine), "paths": paths,
           "reused_after_s0": _share(mine, "reused"), "reused_after_s0_ci95": _bootstrap(mine, "reused"),
           "encoded_tokens": sum(c["encoded"] for c in mine)}
    after = sum(c["after_s0"] for c in mine)
    out["reused_after_s0_encodings_counted"] = (sum(c["reused"] for c in mine) - out["encoded_tokens"]) / after \
        if after else None
    return out


def parity_run(offline, prefix, default, graph, questions: list[str], warmup: int, max_tokens: int,
               tag: str) -> list[dict]:
    """Every call of `graph` over `questions`, three ways (see above): the server (`offline`),
    KVCommEngine `prefix` (partial="prefix") and `default`. The engines live as long as the
    server, so all three pools see the same calls. One record per call."""
    for a in graph:
        for eng in (prefix, default):
            if a[0] not in eng.agents:
                eng.add_agent(*a)
        if a[0] not in offline.agents:
            offline.add_agent(*a)
    records = []
    for j, q in enumerate(questions):
        for eng in (prefix, default):
            eng.new_request()
        replies: dict = {}
        for name, _, template in graph:
            inputs = graph_inputs(template, q, replies)
            v = offline.call(name, inputs, session=f"{tag}{j}", max_tokens=max_tokens)
            rec = {"question": j, "phase": "warmup" if j < warmup else "measure", "agent": name,
                   "server": {"path": v.path, "after_s0": len(v.prompt_ids) - v.s0,
                              "reused": max(0, v.reused_tokens - v.s0), "encoded": v.encoded_tokens,
                              "reason": v.reason}}
            for key, eng in (("engine_prefix", prefix), ("engine_default", default)):
                h = eng.call(name, inputs, reply_ids=v.token_ids)
                rec[key] = {"path": h.path, "after_s0": h.prompt_tokens - eng.agents[name].s0,
                            "reused": h.prompt_tokens - h.computed_tokens - h.s0_tokens,
                            "encoded": h.encoded_tokens, "reason": h.reason}
            records.append(rec)
            replies[name] = v.text.strip() or "none"
    return records


def main(argv=None) -> int:
    import argparse
    import time
    p = argparse.ArgumentParser(description="The vLLM connector against KVCommEngine on the same calls "
                                "(results/vllm/parity.json). Run it in the vLLM environment.")
    p.add_argument("--warmup", type=int, default=5, help="questions that fill the pools first")
    p.add_argument("--questions", type=int, default=8, help="measured questions per graph")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--check-questions", type=int, default=3, help="questions of the same-pool check per graph")
    p.add_argument("--out", default="results/vllm/parity.json")
    args = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from kvcomm.models import embedded_model_dir, load_model
    from kvcomm.vllm.offline import KVCommLLM
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from ..provenance import capture
    from .shop_questions import question
    prov = capture("python", "benchmarks/vllm_parity.py", argv=argv)   # main(argv) records argv, not pytest's
    t0 = time.perf_counter()
    model_dir = embedded_model_dir()
    offline = KVCommLLM(model_dir, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0, block_size=32,
                        kv_cache_memory_bytes=1 << 30, keep_loads=True)
    connector = get_kv_transfer_group()
    model, tok = load_model(model_dir)
    n = args.warmup + args.questions
    out = {"model": "SmolLM2-135M-Instruct (embedded), float32, CPU", "warmup_questions": args.warmup,
           "questions": "kvcomm_app.bench.shop_questions.question(i): a shop report and a question, ~120 tokens",
           "measured_questions": args.questions, "max_tokens": args.max_tokens,
           "graphs": {}, **prov.fields()}
    from kvcomm.engine import KVCommEngine
    # The settings the connector runs at (it defers a content's encoding past its first
    # carrier), and the engine's own defaults.
    prefix = KVCommEngine(model, tok, partial="prefix", defer_first_encoding=True)
    default = KVCommEngine(model, tok)
    for gi, (label, graph) in enumerate(GRAPHS.items()):
        qs = [question(1000 * gi + i) for i in range(n)]
        recs = parity_run(offline, prefix, default, graph, qs, args.warmup, args.max_tokens, f"{label}-")
        measured = [r for r in recs if r["phase"] == "measure"]
        same = sum(r["server"]["path"] == r["engine_prefix"]["path"] for r in measured)
        cmp = compare_with_engine(offline, connector, model, tok, graph,
                                  [question(1000 * gi + 500 + i) for i in range(args.check_questions)],
                                  max_tokens=(args.max_tokens,), session_prefix=f"{label}-check-")
        out["graphs"][label] = {
            "agents": [a[0] for a in graph],
            "server": _summary(measured, "server"), "engine_prefix": _summary(measured, "engine_prefix"),
            "engine_default": _summary(measured, "engine_default"),
            "same_path_server_vs_engine_prefix": same / len(measured) if measured else None,
            "same_pool_check": {k: v for k, v in cmp.to_dict().items() if k != "calls"},
            "calls": recs}
        print(f"{label}: server {out['graphs'][label]['server']['reused_after_s0']:.3f}, engine prefix "
              f"{out['graphs'][label]['engine_prefix']['reused_after_s0']:.3f}, engine default "
              f"{out['graphs'][label]['engine_default']['reused_after_s0']:.3f} of tokens after S0 reused; "
              f"same path {same}/{len(measured)}; same-pool check {cmp.to_dict()['same_path']}, "
              f"KV diff {cmp.kv_max_abs_diff}", flush=True)
    ws = connector.worker_state   # made on the connector's first step
    out["settings"] = {"server": f"{ws.planner.settings.describe()}, min_anchors {ws.pool.config.min_anchors}",
                       "engine_prefix": "partial=prefix, recompute=none, defer_first_encoding, min_anchors 4",
                       "engine_default": "partial=True, recompute=none, min_anchors 4"}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out} ({out['wall_s']} s)")
    return 0
