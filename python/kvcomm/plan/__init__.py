"""The call planner: KVCOMM's per-call logic, written once for every backend.

    from kvcomm.plan import Planner, PlanSettings
    planner = Planner(pool, spec, PlanSettings(partial=True, recompute="none"))
    plan = planner.plan(agent, layout, session, max_new_tokens=64, encode=encode)
    if plan.uses_estimates:
        planner.assemble(plan, k, v)      # S0 + estimated slots into [L, H, T, D] buffers
    ...                                   # the backend runs the model over plan.positions
    planner.record(plan, k, v)            # computed slots -> deltas
    planner.capture(session, "solver", reply_ids, reply_k, reply_v, start)

Modules: template (placeholders, chat frame, token layout), headers (what contents are
encoded behind), state (agents, sessions, contents, replies), decide (the share-or-anchor
decision, tensor-parallel ranks included), recompute (which prompt tokens run), planner (the
per-call steps), replies (which generated tokens are a reply's content), neutral (the
position-neutral frame), defaults. Nothing here imports transformers or vLLM: KVCommEngine
(kvcomm.engine) and the vLLM connector (kvcomm.vllm) are adapters around it.
"""
from .decide import RankGroup, decide, decide_content
from .defaults import DEFAULT_MIN_ANCHORS, DEFAULT_PARTIAL
from .planner import CallPlan, Planner, PlanSettings
from .recompute import DEFAULT_POLICY, RecomputePolicy
from .state import AgentState, Content, Reply, Session, Sessions, agent_from_template_kv, agent_key
from .template import PromptLayout, Template, TemplateError, parse_template

__all__ = ["Planner", "PlanSettings", "CallPlan", "RankGroup", "decide", "decide_content", "AgentState",
           "Content", "Reply", "Session", "Sessions", "agent_from_template_kv", "agent_key", "RecomputePolicy",
           "DEFAULT_POLICY", "DEFAULT_MIN_ANCHORS", "DEFAULT_PARTIAL", "PromptLayout", "Template", "TemplateError",
           "parse_template"]
