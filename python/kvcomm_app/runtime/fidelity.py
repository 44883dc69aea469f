"""Fidelity metrics of paired calls: pure functions over call records (no torch).

A *paired* KVCOMM call ran on exactly the inputs of a dense call and was fed the dense
call's reply (teacher forcing), so the two differ only in how the prompt's KV was made.
Each such call record carries `fidelity`:
    first_agree   the first token's top-1 agrees with dense
    first_kl      KL(dense || kvcomm) of the first token's distribution (nats)
    tf_agree      positions of the dense reply's first K whose top-1 agrees
    tf_positions  positions compared (K, or fewer for a shorter reply)
    tf_kl         mean KL over those positions
Token counts give the token reuse: the share of the prompt tokens after the exact prefix
(`prompt_tokens - s0_tokens`) whose KV the model did not compute. Every token the model ran
counts against it: the prompt tokens of the call's forward (`computed_tokens`), the contents
it encoded behind a header (`encoded_tokens`, charged to the call that paid for them, before
or after its first token), and an early-layer probe's tokens at the share of layers it ran
(`probed_tokens * probe_fraction`). `token_reuse_excluding_encodings` is the figure without
the encodings, kept beside it under that name.

Intervals: one call's path decides all of its tokens, and the calls of one question share
its contents, so tokens, positions and calls are not independent draws. Every interval
here is a percentile bootstrap over questions (the question ids of the calls, resampled
with replacement, B = BOOTSTRAP draws, seeded): for token reuse on SQuAD it gave
[62.4, 91.1] where a Wilson interval over tokens gave [79.0, 80.4].
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict

Z95 = 1.959963984540054
BOOTSTRAP = 1000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial rate; None when n == 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1 (float rounding would miss it by 1e-16).
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def rate(successes: int, n: int) -> dict:
    """A rate with its Wilson interval (independent trials only: see the module docstring)."""
    ci = wilson(successes, n)
    return {"rate": None if n == 0 else successes / n, "n": n, "k": successes,
            "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)]}


def bootstrap_ratios(groups: list, draws: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Percentile 95% intervals of ratio statistics under resampling groups (questions).
    groups: one dict per group, name -> (numerator, denominator) summed over its calls; a
    statistic is sum(numerators) / sum(denominators) over the drawn groups (a draw with a
    zero denominator is skipped). Returns name -> [lo, hi], or None with < 2 groups."""
    def ratio(name):
        def stat(drawn):
            den = sum(g.get(name, (0.0, 0.0))[1] for g in drawn)
            return sum(g.get(name, (0.0, 0.0))[0] for g in drawn) / den if den > 0 else None
        return stat
    out = {}
    for name in sorted({k for g in groups for k in g}):
        ci = bootstrap_interval([[g] for g in groups], ratio(name), draws, seed)
        out[name] = None if ci is None else [round(ci[0], 4), round(ci[1], 4)]
    return out


def bootstrap_interval(groups: list, stat, draws: int = 2000, seed: int = 0) -> list | None:
    """Percentile 95% interval of stat(members) when whole groups (the calls of one question or
    conversation, which decide together) are resampled with replacement. groups: lists of
    members; stat: members -> value or None (a draw it cannot score is skipped). None with
    fewer than 2 groups or no scored draw."""
    if len(groups) < 2:
        return None
    rng = random.Random(seed)
    vals = []
    for _ in range(draws):
        v = stat([m for _ in groups for m in rng.choice(groups)])
        if v is not None:
            vals.append(v)
    if not vals:
        return None
    vals.sort()
    return [vals[int(0.025 * (len(vals) - 1))], vals[int(math.ceil(0.975 * (len(vals) - 1)))]]


def _question(c) -> str:
    return f"{c.question_id}|{c.phase}"


def _group_sums(calls, parts) -> list:
    """Per question (first-seen order): name -> (numerator, denominator) of each part,
    parts: name -> function(call) -> (num, den) or None (the call does not count)."""
    by_q: OrderedDict = OrderedDict()
    for c in calls:
        g = by_q.setdefault(_question(c), {})
        for name, fn in parts.items():
            got = fn(c)
            if got is not None:
                n0, d0 = g.get(name, (0.0, 0.0))
                g[name] = (n0 + got[0], d0 + got[1])
    return list(by_q.values())


def _ratio_entry(num: float, den: float, ci, *, k=None) -> dict:
    return {"rate": None if den == 0 else num / den, "n": den, "k": num if k is None else k, "ci95": ci,
            "ci": "bootstrap over questions"}


def probe_cost(c) -> float:
    """An early-layer probe's tokens in full-forward tokens (its share of the layers)."""
    return float(getattr(c, "probed_tokens", 0) or 0) * float(getattr(c, "probe_fraction", 0.0) or 0.0)


def model_tokens(c) -> float:
    """Tokens after S0 the model computed for this call: the prompt forward, the contents it
    encoded, the probe at its share of layers."""
    return c.computed_tokens + c.encoded_tokens + probe_cost(c)


def paired(calls) -> list:
    """Calls that carry a fidelity comparison and took the reuse or partial path."""
    return [c for c in calls if getattr(c, "fidelity", None) and c.path in ("reuse", "partial")]


def _is_paired(c) -> bool:
    return bool(getattr(c, "fidelity", None)) and c.path in ("reuse", "partial")


def _after(c) -> int:
    return max(c.prompt_tokens - c.s0_tokens, 0)


_FIDELITY_PARTS = {
    "first_token_agreement": lambda c: (float(c.fidelity["first_agree"]), 1.0) if _is_paired(c) else None,
    "first_token_kl": lambda c: (c.fidelity["first_kl"], 1.0) if _is_paired(c) else None,
    "tf32_agreement": lambda c: (float(c.fidelity["tf_agree"]), float(c.fidelity["tf_positions"]))
    if _is_paired(c) else None,
    "tf32_kl": lambda c: (c.fidelity["tf_kl"], 1.0) if _is_paired(c) else None,
}
_TOKEN_PARTS = {
    "token_reuse": lambda c: (_after(c) - model_tokens(c), float(_after(c))),
    "token_reuse_excluding_encodings": lambda c: (_after(c) - c.computed_tokens - probe_cost(c), float(_after(c))),
    "call_reuse": lambda c: (float(c.path == "reuse"), 1.0),
    "call_reuse_or_partial": lambda c: (float(c.path in ("reuse", "partial")), 1.0),
}


def summary(calls, draws: int = BOOTSTRAP) -> dict:
    """Fidelity of paired reuse/partial calls and token reuse over every KVCOMM call given,
    intervals by a bootstrap over questions."""
    p = paired(calls)
    first = sum(1 for c in p if c.fidelity["first_agree"])
    tf_k = sum(c.fidelity["tf_agree"] for c in p)
    tf_n = sum(c.fidelity["tf_positions"] for c in p)
    kls = [c.fidelity["first_kl"] for c in p]
    tf_kls = [c.fidelity["tf_kl"] for c in p]
    ci = bootstrap_ratios(_group_sums(p, _FIDELITY_PARTS), draws)
    return {
        "calls": len(p),
        "first_token_agreement": _ratio_entry(first, len(p), ci.get("first_token_agreement"), k=first),
        "first_token_kl": _mean(kls),
        "first_token_kl_ci95": ci.get("first_token_kl"),
        "first_token_kl_median": _median(kls),
        "tf32_agreement": _ratio_entry(tf_k, tf_n, ci.get("tf32_agreement"), k=tf_k),
        "tf32_kl": _mean(tf_kls),
        "tf32_kl_ci95": ci.get("tf32_kl"),
        **token_reuse(calls, draws),
    }


def token_reuse(calls, draws: int = BOOTSTRAP) -> dict:
    """Over the calls (every path): prompt tokens after the exact S0, and the share of them
    whose KV the model did not compute (`token_reuse`: every token it ran counts, see the
    module docstring; `token_reuse_excluding_encodings`: the content encodings left out).
    Call reuse: calls on the reuse / partial path. `compute`: where the computed tokens went."""
    after = sum(_after(c) for c in calls)
    computed = sum(c.computed_tokens for c in calls)
    encoded = sum(c.encoded_tokens for c in calls)
    probe = sum(probe_cost(c) for c in calls)
    n = len(calls)
    ci = bootstrap_ratios(_group_sums(calls, _TOKEN_PARTS), draws)
    reuse_calls = sum(1 for c in calls if c.path == "reuse")
    some = sum(1 for c in calls if c.path in ("reuse", "partial"))
    return {
        "kvcomm_calls": n,
        "tokens_after_s0": after,
        # not clamped at 0: a call that encodes a content and then computes it anyway runs
        # more tokens than a prefill after S0 would, and the rate says so
        "token_reuse": _ratio_entry(after - computed - encoded - probe, after, ci.get("token_reuse")),
        "token_reuse_excluding_encodings": _ratio_entry(after - computed - probe, after,
                                                        ci.get("token_reuse_excluding_encodings")),
        "compute": {"prompt": computed, "encodings": encoded, "probe": round(probe, 2),
                    "share": None if after == 0 else (computed + encoded + probe) / after},
        "call_reuse": _ratio_entry(reuse_calls, n, ci.get("call_reuse"), k=reuse_calls),
        "call_reuse_or_partial": _ratio_entry(some, n, ci.get("call_reuse_or_partial"), k=some),
        "paths": {k: sum(1 for c in calls if c.path == k) for k in ("reuse", "partial", "dense")},
    }


def breakdown(calls, key, draws: int = BOOTSTRAP // 2) -> "OrderedDict[str, dict]":
    """summary() per group; key(call) -> a group name, or a list of names (a call in several)."""
    groups: OrderedDict[str, list] = OrderedDict()
    for c in calls:
        names = key(c)
        for name in ([names] if isinstance(names, str) else names):
            groups.setdefault(name, []).append(c)
    return OrderedDict((k, summary(v, draws)) for k, v in groups.items())


def by_agent(calls):
    return breakdown(calls, lambda c: c.agent_name)


def by_path(calls):
    """Reuse-path calls (every slot estimated) apart from partial calls (some computed):
    their fidelity differs, and the mix differs between settings."""
    out = breakdown(calls, lambda c: c.path)
    return OrderedDict((k, out[k]) for k in ("reuse", "partial", "dense") if k in out)


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
