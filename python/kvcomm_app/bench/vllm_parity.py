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
    def same_path(self) -> float | None:
        return sum(c["vllm_path"] == c["hf_path"] for c in self.calls) / len(self.calls) if self.calls else None

    def to_dict(self) -> dict:
        return {"kv_max_abs_diff_vs_hf": self.kv_max_abs_diff, "first_token_equal_hf": self.first_token_equal,
                "same_path": self.same_path, "estimated_pairs": len(self.estimated_pairs), "calls": self.calls}


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
                      partial="prefix", recompute=recompute)
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
