"""The connector's settings: the keys of kv_connector_extra_config, and what they become.

`kvcomm serve` (kvcomm.vllm.launch.transfer_config) writes them; both halves of the
connector read them. Unset, the planner's defaults apply (kvcomm.plan.defaults: the same
min_anchors and partial calls as KVCommEngine), so the server and the in-process engine
decide alike unless told otherwise.
"""
from __future__ import annotations

from ..plan.defaults import DEFAULT_MIN_ANCHORS, DEFAULT_PARTIAL
from ..plan.planner import PlanSettings

TOKEN = "server_token"        # shared with the front end; internal fields need it
POOL_FILE = "pool_file"       # optional: an AnchorPool file loaded at start (warm pool)
POOL_ARGS = "pool"            # optional: kvcomm.PoolConfig keyword arguments
PLAN_ARGS = "plan"            # optional: {"partial": bool, "recompute": "none" | "tail=N"}
MAX_SESSIONS = "max_sessions"
LEAD_INS = "lead_ins"
KEEP_LOADS = "keep_loads"     # diagnostics: read back what each load wrote (WorkerSide.kept)


def plan_settings(extra: dict) -> PlanSettings:
    """The planner settings of a prefix-only backend from the extra config; ValueError names a
    bad value (a recompute policy vLLM cannot express, an unknown key)."""
    args = dict(extra.get(PLAN_ARGS) or {})
    unknown = sorted(set(args) - {"partial", "recompute"})
    if unknown:
        raise ValueError(f"kvcomm connector: unknown plan setting(s) {', '.join(unknown)} (partial, recompute)")
    partial = args.get("partial", DEFAULT_PARTIAL)
    if not isinstance(partial, bool):
        raise ValueError(f"kvcomm connector: plan.partial must be true or false, got {partial!r}")
    return PlanSettings(partial=partial, recompute=args.get("recompute"), prefix_only=True)


def pool_args(extra: dict) -> dict:
    """kvcomm.PoolConfig keyword arguments: the extra config's, with the planner's default
    min_anchors unless it sets one."""
    args = dict(extra.get(POOL_ARGS) or {})
    args.setdefault("min_anchors", DEFAULT_MIN_ANCHORS)
    return args
