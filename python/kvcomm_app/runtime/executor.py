"""Running a graph over one question: rounds in order, agents in topological order,
tools between calls, the decision agent last; every call recorded.

The engine is anything with the KVCommEngine interface (add_agent, new_request,
next_round, call -> AgentCall, pool); kvcomm_app.runtime.testing has a scripted one.
Dense and KVCOMM runs of a question go through the same code with the same inputs;
only `mode` differs.
"""
from __future__ import annotations

import time

from .agents import CONDITION, CURRENT, HISTORY, QUESTION, Agent, ToolContext, slot_kind
from .datasets import Problem
from .graph import AgentGraph
from .records import DENSE, KVCOMM, MODES, CallRecord, QuestionRecord, digest_inputs, jsonable
from .workloads import Workload

# What {agent_<id>_history} holds in the first round, before anyone has spoken.
NO_HISTORY = "No reply yet: this is the first round."
# What downstream agents read when an agent's reply is empty (an immediate end of turn):
# a slot's content may not be empty, and an empty slot would hide that the agent failed.
EMPTY_REPLY = "(no reply)"


class GraphRunner:
    """Runs one graph and workload on one or two engines.

    engines: one engine used for both modes (calls switch `mode`) or a dict
    {"dense": eng_a, "kvcomm": eng_b}.
    decision_dense: keep the decision agent on the dense path in KVCOMM runs too (users
    who need decisions identical to dense).
    judge_shadow: in KVCOMM runs, also run the decision agent densely on the identical
    inputs, to measure judge consistency without upstream differences mixed in. The
    shadow call is not counted in TTFT, paths or reuse.
    """

    def __init__(self, graph: AgentGraph, workload: Workload, engines, *, max_new_tokens: int = 128,
                 decision_max_new_tokens: int | None = None, decision_dense: bool = False,
                 judge_shadow: bool = True, do_sample: bool = False, temperature: float = 1.0):
        self.graph = graph
        self.workload = workload
        self.engines = dict(engines) if isinstance(engines, dict) else {m: engines for m in MODES}
        missing = set(MODES) - set(self.engines)
        if missing:
            raise ValueError(f"no engine for mode(s) {sorted(missing)}")
        self.max_new_tokens = max_new_tokens
        self.decision_max_new_tokens = decision_max_new_tokens or max_new_tokens
        self.decision_dense = decision_dense
        self.judge_shadow = judge_shadow
        self.gen = {"do_sample": do_sample, "temperature": temperature}
        self._registered: set[int] = set()
        # Paired evaluation (kvcomm_app.runtime.paired): when a list, each dense-mode call of
        # the next run appends (agent, inputs, round, AgentCall) with `trace_logits` rows of
        # teacher-forced reply logits, for a KVCOMM replay on identical inputs.
        self.trace: list | None = None
        self.trace_logits = 0

    def register(self) -> None:
        """Add every agent to every engine once (idempotent)."""
        for eng in self.engines.values():
            if id(eng) in self._registered:
                continue
            for a in self.graph.all_agents:
                eng.add_agent(a.id, a.role.system_prompt, a.template)
            self._registered.add(id(eng))

    # -- one question ------------------------------------------------------------------

    def run(self, problem: Problem, mode: str, phase: str = "measure") -> QuestionRecord:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.register()
        eng = self.engines[mode]
        start = time.perf_counter()
        eng.new_request()
        question = self.workload.format_question(problem)
        current: dict[str, str] = {}
        previous: dict[str, str] = {}
        conditions: dict[str, str] = {}
        calls: list[CallRecord] = []
        for rnd in range(self.graph.rounds):
            if rnd > 0:
                eng.next_round()
                previous, current, conditions = current, {}, {}
            for agent in self.graph.agents:
                tool_info = None
                if agent.tool is not None and agent.tool.phase == "before":
                    tool_info = self._run_tool(agent, problem, None, current, rnd, conditions)
                inputs = self._inputs(agent, question, current, previous, conditions)
                rec = self._call(eng, agent, inputs, mode, mode, problem, phase, rnd)
                current[agent.id] = rec.text if rec.text.strip() else EMPTY_REPLY
                if agent.tool is not None and agent.tool.phase == "after":
                    tool_info = self._run_tool(agent, problem, rec.text, current, rnd, conditions)
                rec.tool = tool_info
                calls.append(rec)

        judge_choice = shadow_choice = None
        final_text = ""
        if self.graph.decision is not None:
            d = self.graph.decision
            inputs = self._inputs(d, question, current, previous, conditions)
            call_mode = DENSE if (mode == DENSE or self.decision_dense) else KVCOMM
            rec = self._call(eng, d, inputs, mode, call_mode, problem, phase, self.graph.rounds - 1)
            calls.append(rec)
            final_text = rec.text
            judge_choice = self.workload.choice(final_text, problem)
            if mode == KVCOMM and call_mode == KVCOMM and self.judge_shadow:
                shadow = self._call(eng, d, inputs, mode, DENSE, problem, phase,
                                    self.graph.rounds - 1, shadow=True)
                calls.append(shadow)
                shadow_choice = self.workload.choice(shadow.text, problem)
        else:  # no decision agent: the last worker's reply is the answer
            final_text = calls[-1].text if calls else ""
            judge_choice = self.workload.choice(final_text, problem)

        prediction = self.workload.extract(final_text, problem)
        correct = bool(self.workload.score(prediction, problem))
        graded = self.workload.partial_score
        score = None if graded is None else float(graded(prediction, problem))
        pool_size, pool_bytes = _pool_stats(eng)
        return QuestionRecord(
            question_id=problem.id, task=problem.task, mode=mode, phase=phase, gold=problem.gold,
            prediction=prediction, correct=correct, final_text=final_text,
            judge_choice=judge_choice, shadow_choice=shadow_choice, calls=calls,
            pool_size=pool_size, pool_bytes=pool_bytes,
            wall_ms=(time.perf_counter() - start) * 1000.0, score=score)

    # -- helpers -----------------------------------------------------------------------

    def _inputs(self, agent: Agent, question: str, current: dict[str, str],
                previous: dict[str, str], conditions: dict[str, str]) -> dict[str, str]:
        inputs = {}
        for slot in agent.reads:
            if slot.kind == QUESTION:
                value = question
            elif slot.kind == CURRENT:
                value = current[slot.source]
            elif slot.kind == HISTORY:
                value = previous.get(slot.source, NO_HISTORY)
            elif slot.kind == CONDITION:
                value = conditions[slot.source]
            else:  # pragma: no cover - SlotRef validates kinds
                raise AssertionError(slot.kind)
            inputs[slot.placeholder] = value
        return inputs

    def _run_tool(self, agent: Agent, problem: Problem, reply: str | None, current: dict[str, str],
                  rnd: int, conditions: dict[str, str]) -> dict:
        upstream = {j: current[j] for j in (s.source for s in agent.reads if s.kind == CURRENT)}
        t0 = time.perf_counter()
        result = agent.tool.run(ToolContext(problem, agent.id, reply, upstream, rnd))
        text = result.text.strip() or "The tool produced no output."
        conditions[agent.id] = text
        return {"name": agent.tool.name, "phase": agent.tool.phase, "text": text,
                "ms": (time.perf_counter() - t0) * 1000.0, "details": jsonable(result.details)}

    def _call(self, eng, agent: Agent, inputs: dict[str, str], mode: str, call_mode: str,
              problem: Problem, phase: str, rnd: int, shadow: bool = False) -> CallRecord:
        budget = self.decision_max_new_tokens if agent.is_decision else self.max_new_tokens
        traced = self.trace is not None and call_mode == DENSE and not shadow
        extra = {"reply_logits": self.trace_logits} if traced and self.trace_logits else {}
        out = eng.call(agent.id, inputs, mode=call_mode, max_new_tokens=budget, **self.gen, **extra)
        if traced:
            self.trace.append((agent, dict(inputs), rnd, out))
        return call_record(out, agent, inputs, problem, mode, call_mode, phase, rnd, shadow)


def call_record(out, agent: Agent, inputs: dict[str, str], problem: Problem, mode: str, call_mode: str,
                phase: str, rnd: int, shadow: bool = False) -> CallRecord:
    """The record of one engine call (an AgentCall, or a scripted engine's equivalent)."""
    return CallRecord(
            question_id=problem.id, mode=mode, phase=phase, round=rnd, agent_id=agent.id,
            agent_name=agent.name, role=agent.role.name, call_mode=call_mode,
            path=str(out.path), reason=str(out.reason or ""), ttft_ms=float(out.ttft_ms),
            text=out.text, inputs_digest=digest_inputs(inputs), is_decision=agent.is_decision,
            shadow=shadow, timings={k: float(v) for k, v in (out.timings or {}).items()},
            first_token_id=None if out.first_token_id is None else int(out.first_token_id),
            prompt_tokens=int(out.prompt_tokens or 0), new_tokens=int(out.new_tokens or 0),
            slot_decisions=jsonable(out.slot_decisions or {}),
            slot_gates=jsonable(out.slot_gates or {}),
            s0_tokens=int(getattr(out, "s0_tokens", 0) or 0),
            computed_tokens=int(getattr(out, "computed_tokens", out.prompt_tokens or 0) or 0),
            encoded_tokens=int(getattr(out, "encoded_tokens", 0) or 0),
            recomputed=jsonable(getattr(out, "recomputed", None) or {}),
            slot_anchors=jsonable(getattr(out, "slot_anchors", None) or {}),
            probed_tokens=int(getattr(out, "probed_tokens", 0) or 0),
            probe_fraction=float(getattr(out, "probe_fraction", 0.0) or 0.0),
            slot_kinds={s.placeholder: slot_kind(s) for s in agent.reads})


def _pool_stats(eng) -> tuple[int | None, int | None]:
    pool = getattr(eng, "pool", None)
    if pool is None:
        return None, None
    try:
        return int(pool.size()), int(pool.memory_bytes())
    except Exception:  # a pool that cannot report is not a reason to lose the record
        return None, None
