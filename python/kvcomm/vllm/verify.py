"""Checks of the connector against the Hugging Face engine (used by the tests and the bench).

reuse_vs_hf: the same calls through vLLM with the connector (KVCommLLM, engine in this
process, keep_loads on) and through KVCommEngine on the same weights, both with the same
anchor pool (the connector's, saved and loaded into the engine before every call). For
every call that takes the reuse path in both, it compares the KV the connector wrote into
vLLM's blocks with the KV the engine assembled (max abs difference; each side computed
its exact S0, template segments and content bases with its own forward passes, so the
difference is the two implementations' float32 rounding) and the first generated token.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field


@dataclass
class HFComparison:
    calls: list = field(default_factory=list)   # per call: agent, paths, first tokens, max abs diffs

    @property
    def reuse_pairs(self) -> list:
        """Calls both engines ran on the reuse path from the same kinds of bases."""
        return [c for c in self.calls if "k_max_abs_diff" in c]

    @property
    def kv_max_abs_diff(self) -> float | None:
        diffs = [max(c["k_max_abs_diff"], c["v_max_abs_diff"]) for c in self.reuse_pairs]
        return max(diffs) if diffs else None

    @property
    def first_token_equal(self) -> float | None:
        pairs = self.reuse_pairs
        return sum(c["first_equal"] for c in pairs) / len(pairs) if pairs else None

    def to_dict(self) -> dict:
        return {"kv_max_abs_diff_vs_hf": self.kv_max_abs_diff, "first_token_equal_hf": self.first_token_equal,
                "reuse_pairs": len(self.reuse_pairs), "calls": self.calls}


def _hf_call(eng, agent, inputs, max_new_tokens, reply_ids):
    if hasattr(eng, "keep_last_cache"):
        eng.keep_last_cache = True
        out = eng.call(agent, inputs, max_new_tokens=max_new_tokens, reply_ids=reply_ids)
        return out, eng.last_cache
    out = eng.call(agent, inputs, max_new_tokens=max_new_tokens, reply_ids=reply_ids, keep_cache=True)
    return out, out.cache


def reuse_vs_hf(offline, connector, hf_model, hf_tokenizer, graph, questions, *, max_tokens=(12, 4),
                session_prefix="cmp") -> HFComparison:
    """graph: [(agent, system, template)] run in order per question; each agent's inputs
    are {user_question} and the previous agents' replies as {agent_<name>_current}.
    The vLLM calls do not change the pool (learn=False), so every call of both engines
    sees the same pool."""
    from .. import AnchorPool
    from ..engine import KVCommEngine
    out = HFComparison()
    hf = KVCommEngine(hf_model, hf_tokenizer, pool=AnchorPool())
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
                inputs = {"user_question": q}
                inputs.update({f"agent_{a}_current": replies[a] for a in replies if f"{{agent_{a}_current}}" in template})
                budget = max_tokens[min(i, len(max_tokens) - 1)]
                v = offline.call(name, inputs, session=sid, max_tokens=budget, learn=False)
                hf.pool.load(pool_file)
                h, cache = _hf_call(hf, name, inputs, budget, v.token_ids)
                rec = {"question": j, "agent": name, "vllm_path": v.path, "hf_path": h.path,
                       "vllm_first": v.token_ids[0], "hf_first": h.first_token_id,
                       "first_equal": v.token_ids[0] == h.first_token_id}
                # KVCommEngine always captures a reply (it computes the last token's KV with one
                # more forward); the connector captures one only if that token was fed back, and
                # otherwise encodes it behind the reply header: then the two bases differ by design.
                encoded = [a for a in replies if f"{{agent_{a}_current}}" in template
                           and offline.captured(sid, a) is None]
                if encoded:
                    rec["note"] = f"reply of {', '.join(encoded)} encoded by vLLM, captured by the HF engine"
                kept = connector.kept.get(v.request_id)
                if kept is None:   # the engine core may suffix request ids
                    kept = next((kv for rid, kv in connector.kept.items() if rid.startswith(v.request_id + "-")),
                                None)
                if v.path == "reuse" and h.path == "reuse" and kept is not None and not encoded:
                    T = len(v.prompt_ids)
                    K, V = kept
                    rec["k_max_abs_diff"] = float((K.float() - cache.k[:, :, :T - 1].float()).abs().max())
                    rec["v_max_abs_diff"] = float((V.float() - cache.v[:, :, :T - 1].float()).abs().max())
                elif v.path == "reuse" and h.path == "reuse":
                    rec["vllm_path"] = "reuse (not compared)"
                out.calls.append(rec)
                replies[name] = v.text.strip() or "none"
    return out


def free_port() -> int:
    """A free loopback port for a test or bench server."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
