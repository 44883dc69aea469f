"""Teacher-forced paired evaluation: every KVCOMM call against a dense twin on identical inputs.

Comparing a KVCOMM run with a dense run end to end mixes two things: what reuse changes
in one call, and how a small model's greedy decoding amplifies one different token into a
different reply that every downstream agent then reads. Here the dense run leads: its
calls are replayed, in order, on a KVCOMM engine with exactly the same inputs (the dense
replies flow downstream in both modes) and each KVCOMM call is fed the dense call's reply
(teacher forcing). Per call:

- first token: top-1 agreement with dense, and KL(dense || kvcomm) of its distribution;
- the first `positions` tokens of the dense reply fed to both caches: per position top-1
  agreement and KL.

The replayed call captures the dense reply's tokens as computed on its own (estimated)
cache, as a free-running KVCOMM call captures its own reply, so downstream slots are
estimated from that KV: every agent and slot kind is measured, not only the calls whose
upstream happened to match. The KVCOMM engine must be a separate engine with its own pool
from the free-running KVCOMM run's, so neither sees the other's anchors.

Timing: the replayed calls see exactly the dense call's inputs, so their TTFT is the one to
compare with dense (a free-running KVCOMM call reads its own mode's replies). With a
`baseline` engine (estimator 'none': a dense prefill after the agent's cached exact S0,
what prefix caching gives) each call is also timed that way on the same inputs, right
before the replay (CallRecord.prefix_ttft_ms).
"""
from __future__ import annotations

import time

from .executor import call_record
from .records import PAIRED, WARMUP, QuestionRecord

DEFAULT_POSITIONS = 32


def compare_logits(dense, kvcomm) -> dict:
    """Fidelity of one call from its reply logits [rows, vocab] in both modes (row 0: the
    first token). KL(dense || kvcomm) in nats per row; top-1 agreement per row."""
    import torch   # here, so the runtime imports without torch until a paired run

    rows = min(dense.shape[0], kvcomm.shape[0])
    d = torch.log_softmax(dense[:rows].float(), dim=-1)
    k = torch.log_softmax(kvcomm[:rows].float(), dim=-1)
    kl = (d.exp() * (d - k)).sum(dim=-1).clamp_min(0.0)
    agree = d.argmax(dim=-1) == k.argmax(dim=-1)
    return {"first_agree": bool(agree[0]), "first_kl": float(kl[0]),
            "tf_agree": int(agree.sum()), "tf_positions": int(rows), "tf_kl": float(kl.mean())}


class PairedReplay:
    """Replays a dense run's traced calls (GraphRunner.trace) on a KVCOMM engine."""

    def __init__(self, engine, graph, workload, positions: int = DEFAULT_POSITIONS,
                 label: str | None = None, baseline=None):
        if positions < 1:
            raise ValueError(f"paired positions must be >= 1, got {positions}")
        self.engine = engine
        self.label = label   # None: the run's own settings; else a variant's (records carry it)
        self.graph = graph
        self.workload = workload
        self.positions = positions
        self.baseline = baseline
        self._registered = False

    def register(self) -> None:
        if not self._registered:
            for eng in [self.engine] + ([self.baseline] if self.baseline is not None else []):
                for a in self.graph.all_agents:
                    eng.add_agent(a.id, a.role.system_prompt, a.template)
            self._registered = True

    def _uses_pool(self) -> bool:
        planner = getattr(self.engine, "planner", None)
        return planner is None or planner.estimator.uses_anchors

    def run(self, problem, phase: str, trace: list) -> QuestionRecord:
        """trace: (agent, inputs, round, dense AgentCall with reply_logits) in call order."""
        self.register()
        eng = self.engine
        start = time.perf_counter()
        # Warm-up questions fill the pool; an estimator without anchors has nothing to fill.
        skip = phase == WARMUP and not self._uses_pool()
        eng.new_request()
        calls, rnd_now = [], 0
        final_text = ""
        for agent, inputs, rnd, dense in ([] if skip else trace):
            while rnd_now < rnd:
                eng.next_round()
                rnd_now += 1
            reply = list(dense.token_ids)
            prefix_ms = None
            if self.baseline is not None:
                self.baseline.new_request()
                prefix_ms = float(self.baseline.call(agent.id, inputs, mode="kvcomm", max_new_tokens=1,
                                                     capture=False).ttft_ms)
            out = eng.call(agent.id, inputs, mode="kvcomm", max_new_tokens=len(reply), reply_ids=reply,
                           reply_logits=self.positions)
            rec = call_record(out, agent, inputs, problem, PAIRED, "kvcomm", phase, rnd)
            rec.prefix_ttft_ms = prefix_ms
            if dense.reply_logits is not None and out.reply_logits is not None:
                rec.fidelity = compare_logits(dense.reply_logits, out.reply_logits)
                rec.fidelity["dense_first_token_id"] = int(dense.first_token_id)
            calls.append(rec)
        if trace:
            final_text = trace[-1][3].text
        prediction = self.workload.extract(final_text, problem)
        pool = getattr(eng, "pool", None)
        return QuestionRecord(
            question_id=problem.id, task=problem.task, mode=PAIRED, phase=phase, gold=problem.gold,
            prediction=prediction, correct=bool(self.workload.score(prediction, problem)),
            final_text=final_text, judge_choice=self.workload.choice(final_text, problem), calls=calls,
            pool_size=None if pool is None else int(pool.size()),
            pool_bytes=None if pool is None else int(pool.memory_bytes()),
            wall_ms=(time.perf_counter() - start) * 1000.0, variant=self.label)
