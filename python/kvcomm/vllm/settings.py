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
POOL_FILE = "pool_file"       # optional: the AnchorPool file loaded at start and saved to (kvcomm.vllm.pool_store)
POOL_NEW = "pool_new"         # a missing pool file starts an empty pool (saved there) instead of an error
SAVE_EVERY_S = "save_every_s"             # save the pool this often while it changes (default 600)
SAVE_EVERY_ANCHORS = "save_every_anchors"  # ... or after this many new anchors (default 50)
POOL_ARGS = "pool"            # optional: kvcomm.PoolConfig keyword arguments
PLAN_ARGS = "plan"            # optional: {"partial": bool, "recompute": "none" | "tail=N",
                              #            "defer_first_encoding": bool, "head_share": float,
                              #            "estimate_anchors": int}
MAX_SESSIONS = "max_sessions"
SESSION_BYTES = "session_bytes"    # KV the sessions may hold (content bases, encodings, replies); default 1 GiB
TEMPLATE_BYTES = "template_bytes"  # KV of the template shapes kept (exact prefixes, segments); default 256 MiB
LEAD_INS = "lead_ins"
KEEP_LOADS = "keep_loads"     # diagnostics: read back what each load wrote (WorkerSide.kept)


def plan_settings(extra: dict) -> PlanSettings:
    """The planner settings of a prefix-only backend from the extra config; ValueError names a
    bad value (a recompute policy vLLM cannot express, an unknown key)."""
    args = dict(extra.get(PLAN_ARGS) or {})
    known = ("partial", "recompute", "defer_first_encoding", "head_share", "estimate_anchors")
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"kvcomm connector: unknown plan setting(s) {', '.join(unknown)} ({', '.join(known)})")
    flags = {k: args.get(k, default) for k, default in (("partial", DEFAULT_PARTIAL), ("defer_first_encoding", True))}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"kvcomm connector: plan.{k} must be true or false, got {v!r}")
    # The server defers a content's encoding past its first carrier's first token by default:
    # with several calls in flight it then costs no call its time to first token.
    given = {k: args[k] for k in ("head_share", "estimate_anchors") if args.get(k) is not None}
    return PlanSettings(recompute=args.get("recompute"), prefix_only=True, **flags, **given)


def pool_args(extra: dict) -> dict:
    """kvcomm.PoolConfig keyword arguments: the extra config's, with the planner's default
    min_anchors unless it sets one."""
    args = dict(extra.get(POOL_ARGS) or {})
    args.setdefault("min_anchors", DEFAULT_MIN_ANCHORS)
    return args
