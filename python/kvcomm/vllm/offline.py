"""KVCOMM with vLLM's offline LLM class: agent calls without a server.

    from kvcomm.vllm.offline import KVCommLLM
    eng = KVCommLLM(model_path, dtype="float32")
    eng.add_agent("solver", "You solve math problems.", "Problem:\\n{user_question}\\n\\nSolve it.")
    out = eng.call("solver", {"user_question": "What is 2 + 3?"}, session="q1", max_tokens=32)
    out.text, out.path, out.token_ids

The same steps as the server's front end (kvcomm.vllm.prepare): the agent's template
pass and the contents' header encodings run as one-token requests whose prefill the
connector reads back, then the call itself. One call at a time.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .launch import transfer_config
from .prepare import Preparer, kv_params
from .protocol import KEY, parse_call


@dataclass
class OfflineCall:
    text: str
    token_ids: list
    path: str                  # "reuse", "partial", "dense" or "plain"
    reason: str
    slots: dict = field(default_factory=dict)
    prompt_ids: list = field(default_factory=list)
    reply_ids: list | None = None
    request_id: str = ""
    reused_tokens: int = 0     # prompt tokens vLLM did not compute (the connector's prefix)
    s0: int = 0                # the agent's exact prefix (tokens before the first placeholder)
    encoded_tokens: int = 0    # content tokens this call had encoded behind a header (before or after it)


class KVCommLLM:
    """vLLM's LLM with the KVCOMM connector. llm_kwargs go to vllm.LLM."""

    def __init__(self, model: str, *, token: str | None = None, pool: dict | None = None, keep_loads: bool = False,
                 plan: dict | None = None, **llm_kwargs):
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.config import KVTransferConfig

        from .settings import plan_settings
        cfg = transfer_config(token=token, pool=pool, keep_loads=keep_loads, plan=plan)
        self.defer = plan_settings(cfg["kv_connector_extra_config"]).defer_first_encoding
        self.token = cfg["kv_connector_extra_config"]["server_token"]
        self.llm = LLM(model=model, kv_transfer_config=KVTransferConfig(**cfg), **llm_kwargs)
        self.prep = Preparer(AutoTokenizer.from_pretrained(model, local_files_only=True))
        self.agents: dict[str, tuple[str, str]] = {}
        self._done: set = set()
        self._replies: dict = {}

    def captured(self, session: str, agent: str, rnd: int = 0):
        """The reply ids the connector captured for that call (None: not captured)."""
        return self._replies.get((session, agent, rnd))

    def add_agent(self, name: str, system_prompt: str, template: str) -> None:
        self.agents[name] = (system_prompt or "", template)

    def _one_token(self, job) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        sp = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": kv_params(job.server,
                                                                                                        self.token)})
        self.llm.generate([TokensPrompt(prompt_token_ids=list(job.ids))], sp, use_tqdm=False)

    def body(self, agent: str, inputs: dict, session: str, rnd: int = 0, learn: bool = True) -> dict:
        """The chat-completion body a client would send for this call."""
        from ..plan.template import fill, parse_template
        system, template = self.agents[agent]
        user, spans = fill(parse_template(template), dict(inputs), agent)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return {"messages": msgs, "kv_transfer_params": {KEY: {
            "agent": agent, "template": template, "slots": {n: [a, b] for n, a, b in spans},
            "session": session, "round": rnd, "learn": learn}}}

    def call(self, agent: str, inputs: dict, *, session: str, rnd: int = 0, max_tokens: int = 32,
             learn: bool = True, kvcomm: bool = True) -> OfflineCall:
        """One greedy agent call. kvcomm=False: the same prompt as a plain vLLM request."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        call = parse_call(self.body(agent, inputs, session, rnd, learn), self.prep.specials)
        prep = self.prep.prepare(call)
        if not kvcomm:
            out = self.llm.generate([TokensPrompt(prompt_token_ids=list(prep.lay.ids))],
                                    SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)[0]
            o = out.outputs[0]
            return OfflineCall(o.text, list(o.token_ids), "plain", "no kvcomm parameters",
                               prompt_ids=list(prep.lay.ids))
        # A reply the engine captured is its own base; anything else is encoded - before the
        # call, or (deferral, as the server does) after it when this call carries it first.
        skip = {(session, "reply", ids) for _, owner, r, ids in prep.replies
                if self._replies.get((session, owner, r)) == ids}
        encoded, later, deferred = 0, [], []
        for job in prep.encodes:
            if any(job.key == j.key for j in later):   # the same content in two slots of this call
                deferred.append(job.server["slot"])
            if job.key in self._done or job.key in skip:
                continue
            if self.defer:
                later.append(job)
                deferred.append(job.server["slot"])
            else:
                self._one_token(job)
                encoded += len(job.server["content_ids"])
            self._done.add(job.key)
        if prep.template.key not in self._done:
            if self.defer and prep.lay.spans and prep.lay.spans[0][0] in deferred:
                later.insert(0, prep.template)   # the call could use nothing of it but S0
            else:
                self._one_token(prep.template)
            self._done.add(prep.template.key)
        server = dict(prep.server, token=self.token, deferred=deferred)
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args={"kv_transfer_params": {
            KEY: dict(call_params(call), _server=server)}})
        prompt = TokensPrompt(prompt_token_ids=list(prep.lay.ids), cache_salt=f"kvcomm-{uuid.uuid4().hex}")
        out = self.llm.generate([prompt], sp, use_tqdm=False)[0]
        o = out.outputs[0]
        info = (out.kv_transfer_params or {}).get(KEY, {})
        reply = info.get("reply_ids")
        self._replies[(session, agent, rnd)] = tuple(reply) if reply else None
        for job in later:
            self._one_token(job)
            encoded += len(job.server.get("content_ids", ()))
        return OfflineCall(o.text, list(o.token_ids), info.get("path", "?"), info.get("reason", ""),
                           info.get("slots", {}), list(prep.lay.ids), reply, out.request_id,
                           int(info.get("reused_tokens", 0)), prep.lay.s0, encoded)


def call_params(call) -> dict:
    return {"agent": call.agent, "template": call.template.text, "session": call.session, "round": call.round,
            "learn": call.learn, "slots": {n: [a, b] for n, a, b in call.spans}}
