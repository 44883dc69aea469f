"""Fidelity metrics of paired calls: pure functions over call records (no torch).

A *paired* KVCOMM call ran on exactly the inputs of a dense call and was fed the dense
call's reply (teacher forcing), so the two differ only in how the prompt's KV was made.
Each such call record carries `fidelity`:
    first_agree   the first token's top-1 agrees with dense
    first_kl      KL(dense || kvcomm) of the first token's distribution (nats)
    tf_agree      positions of the dense reply's first K whose top-1 agrees
    tf_positions  positions compared (K, or fewer for a shorter reply)
    tf_kl         mean KL over those positions
Rates come with Wilson 95% intervals. Token counts (`s0_tokens`, `computed_tokens`,
`encoded_tokens`) give the token reuse: the share of prompt tokens after the exact prefix
whose KV the call did not compute (charging a content's encoding to the call that paid it,
or not).
"""
from __future__ import annotations

import math
from collections import OrderedDict

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial rate; None when n == 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, n: int) -> dict:
    ci = wilson(successes, n)
    return {"rate": None if n == 0 else successes / n, "n": n, "k": successes,
            "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)]}


def paired(calls) -> list:
    """Calls that carry a fidelity comparison and took the reuse or partial path."""
    return [c for c in calls if getattr(c, "fidelity", None) and c.path in ("reuse", "partial")]


def summary(calls) -> dict:
    """Fidelity of paired reuse/partial calls and token reuse over every KVCOMM call given."""
    p = paired(calls)
    first = sum(1 for c in p if c.fidelity["first_agree"])
    tf_k = sum(c.fidelity["tf_agree"] for c in p)
    tf_n = sum(c.fidelity["tf_positions"] for c in p)
    kls = [c.fidelity["first_kl"] for c in p]
    tf_kls = [c.fidelity["tf_kl"] for c in p]
    return {
        "calls": len(p),
        "first_token_agreement": rate(first, len(p)),
        "first_token_kl": _mean(kls),
        "first_token_kl_median": _median(kls),
        "tf32_agreement": rate(tf_k, tf_n),
        "tf32_kl": _mean(tf_kls),
        **token_reuse(calls),
    }


def token_reuse(calls) -> dict:
    """Over the calls (every path): prompt tokens after the exact S0, and the share of
    them whose KV the call's forward did not compute; `_with_encoding` also charges the
    content encodings a call paid for. Call reuse: calls on the reuse / partial path."""
    after = sum(max(c.prompt_tokens - c.s0_tokens, 0) for c in calls)
    computed = sum(c.computed_tokens for c in calls)
    encoded = sum(c.encoded_tokens for c in calls)
    n = len(calls)
    return {
        "kvcomm_calls": n,
        "tokens_after_s0": after,
        "token_reuse": rate(max(after - computed, 0), after),
        "token_reuse_with_encoding": rate(max(after - computed - encoded, 0), after),
        "call_reuse": rate(sum(1 for c in calls if c.path == "reuse"), n),
        "call_reuse_or_partial": rate(sum(1 for c in calls if c.path in ("reuse", "partial")), n),
        "paths": {k: sum(1 for c in calls if c.path == k) for k in ("reuse", "partial", "dense")},
    }


def breakdown(calls, key) -> "OrderedDict[str, dict]":
    """summary() per group; key(call) -> a group name, or a list of names (a call in several)."""
    groups: OrderedDict[str, list] = OrderedDict()
    for c in calls:
        names = key(c)
        for name in ([names] if isinstance(names, str) else names):
            groups.setdefault(name, []).append(c)
    return OrderedDict((k, summary(v)) for k, v in groups.items())


def by_agent(calls):
    return breakdown(calls, lambda c: c.agent_name)


def by_slot_kind(calls):
    """Per kind of slot the call reads (question, condition, reply): a call reading two kinds
    counts in both."""
    return breakdown(calls, lambda c: sorted(set(c.slot_kinds.values())) or ["none"])


def by_anchors(calls):
    """By the fewest anchors any estimated slot of the call was built from (2, 3, ..., '6+');
    calls with no estimated slot are 'none'."""
    def bucket(c):
        counts = [len(v) for v in (c.slot_anchors or {}).values()]
        if not counts:
            return "none"
        m = min(counts)
        return "6+" if m >= 6 else str(m)
    out = breakdown(calls, bucket)
    order = ["none", "1", "2", "3", "4", "5", "6+"]
    return OrderedDict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))


def _mean(xs):
    return None if not xs else sum(xs) / len(xs)


def _median(xs):
    if not xs:
        return None
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2
