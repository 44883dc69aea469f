"""Metrics: pure functions over call and question records (no engine, no model).

Conventions, stated once:
- Only `phase == "measure"` records count unless a function is given others; warm-up
  calls (which fill the anchor pool) are reported separately by the caller.
- Shadow calls (the decision agent re-run densely for judge consistency) count only in
  judge consistency and first-token agreement, never in TTFT, paths or reuse rate.
- A KVCOMM call's TTFT is counted whichever path it took: falling back to dense is part
  of the method's cost. Work a call does after its first token for the agents after it
  (cutting its reply's KV and deciding that slot, `capture`; encoding contents it carried
  first, `encode_after`) is charged to the first later call that reads that reply or
  content, as the first reader of a question pays for encoding it (charged_ttft).
- TTFT is compared on identical inputs: when a run has paired replays (the dense run's
  calls replayed with the same inputs), KVCOMM's TTFT is the replays', not the free-running
  calls' (whose inputs are their own mode's replies). Beside full dense prefill, the
  baseline a user would run is dense prefill with the agent's exact S0 cached (prefix
  caching: `prefix_ttft_ms` of the paired records); the headline speedup is against it
  when it was measured.
- Answers compare as extracted values; two missing answers (None) agree.
Every function returns None where its denominator would be zero.
"""
from __future__ import annotations

import re
import statistics
from collections import OrderedDict

from . import fidelity
from .records import DENSE, KVCOMM, MEASURE, PAIRED, CallRecord, QuestionRecord

REUSE = "reuse"
PARTIAL = "partial"   # some slots estimated, the others computed in context
# Reason prefix of calls the engine's correctness gate sent dense (kvcomm.engine.gate.
# REASON_PREFIX; repeated here so metrics import without the engine and transformers;
# a test checks the two agree).
GATE_REASON = "correctness gate"


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def measured(questions: list[QuestionRecord], phase: str = MEASURE) -> list[QuestionRecord]:
    return [q for q in questions if q.phase == phase]


def all_calls(questions: list[QuestionRecord]) -> list[CallRecord]:
    return [c for q in questions for c in q.calls]


def kvcomm_calls(calls: list[CallRecord]) -> list[CallRecord]:
    """The calls a KVCOMM run made for its own answer (shadow calls excluded)."""
    return [c for c in calls if c.mode == KVCOMM and not c.shadow]


def reuse_rate(calls: list[CallRecord]) -> float | None:
    """Agent calls on the reuse path / all calls of the KVCOMM runs (a decision agent pinned
    to dense counts as a dense call)."""
    kv = kvcomm_calls(calls)
    return _ratio(sum(1 for c in kv if c.path == REUSE), len(kv))


def gate_refused(calls: list[CallRecord]) -> int:
    """KVCOMM calls that ran dense because the correctness gate refused reuse for the model."""
    return sum(1 for c in kvcomm_calls(calls) if c.path != REUSE and c.reason.startswith(GATE_REASON))


def path_counts(calls: list[CallRecord]) -> "OrderedDict[str, dict[str, int]]":
    """Per agent (first-seen order): how many KVCOMM calls took each path."""
    out: OrderedDict[str, dict[str, int]] = OrderedDict()
    for c in kvcomm_calls(calls):
        out.setdefault(c.agent_name, {REUSE: 0, PARTIAL: 0, DENSE: 0})
        out[c.agent_name][c.path] = out[c.agent_name].get(c.path, 0) + 1
    return out


def accuracy(questions: list[QuestionRecord], mode: str) -> float | None:
    qs = [q for q in questions if q.mode == mode]
    return _ratio(sum(1 for q in qs if q.correct), len(qs))


def mean_score(questions: list[QuestionRecord], mode: str) -> float | None:
    """Mean graded score (e.g. token F1) of a mode's questions; None when the task has none."""
    xs = [q.score for q in questions if q.mode == mode and q.score is not None]
    return sum(xs) / len(xs) if xs else None


def _pairs(questions: list[QuestionRecord]) -> list[tuple[QuestionRecord, QuestionRecord]]:
    """(dense, kvcomm) records of the same question and phase."""
    dense = {(q.question_id, q.phase): q for q in questions if q.mode == DENSE}
    return [(dense[(q.question_id, q.phase)], q) for q in questions
            if q.mode == KVCOMM and (q.question_id, q.phase) in dense]


def answer_agreement(questions: list[QuestionRecord]) -> float | None:
    """Questions whose KVCOMM final answer equals the dense run's / questions run both ways."""
    pairs = _pairs(questions)
    return _ratio(sum(1 for d, k in pairs if d.prediction == k.prediction), len(pairs))


def judge_consistency(questions: list[QuestionRecord]) -> float | None:
    """Does the decision agent choose under KVCOMM as it does under dense *on the same
    inputs*? Compared with its shadow dense call; a decision agent pinned to dense is
    consistent by construction. Questions with neither are left out."""
    agree = total = 0
    for q in questions:
        if q.mode != KVCOMM:
            continue
        decision = next((c for c in q.calls if c.is_decision and not c.shadow), None)
        if decision is not None and decision.call_mode == DENSE:
            agree, total = agree + 1, total + 1
        elif any(c.shadow for c in q.calls):
            agree += q.judge_choice == q.shadow_choice
            total += 1
    return _ratio(agree, total)


def judge_without_choice(questions: list[QuestionRecord]) -> int:
    """Shadow-compared questions where neither the KVCOMM decision nor its dense shadow
    gave an extractable choice: they count as consistent above (both chose nothing),
    which says little, so the report shows how many there were."""
    return sum(1 for q in questions if q.mode == KVCOMM and any(c.shadow for c in q.calls)
               and q.judge_choice is None and q.shadow_choice is None)


def first_token_pairs(calls: list[CallRecord]) -> list[tuple[CallRecord, CallRecord]]:
    """(dense, kvcomm) calls that saw identical inputs: the same agent, question, round and
    input digest in the dense run and in the KVCOMM run, plus each decision agent's shadow
    pair. Calls downstream of a reply that already differed are not comparable."""
    dense = {(c.question_id, c.phase, c.round, c.agent_id): c for c in calls
             if c.mode == DENSE and not c.shadow}
    shadows = {(c.question_id, c.phase, c.round, c.agent_id): c for c in calls if c.shadow}
    pairs = []
    for c in kvcomm_calls(calls):
        key = (c.question_id, c.phase, c.round, c.agent_id)
        if key in shadows and c.call_mode == KVCOMM:
            pairs.append((shadows[key], c))
        elif key in dense and dense[key].inputs_digest == c.inputs_digest:
            pairs.append((dense[key], c))
    return pairs


def first_token_agreement(calls: list[CallRecord], reuse_only: bool = False) -> tuple[float | None, int]:
    """(agreement of the first generated token with dense on identical inputs, number of
    pairs). reuse_only: count only KVCOMM calls that took the reuse path."""
    pairs = [(d, k) for d, k in first_token_pairs(calls)
             if d.first_token_id is not None and k.first_token_id is not None
             and (not reuse_only or k.path == REUSE)]
    return _ratio(sum(1 for d, k in pairs if d.first_token_id == k.first_token_id), len(pairs)), len(pairs)


_REPLY_SLOT = re.compile(r"^agent_(.+)_(current|history)$")
_ENCODED_KINDS = ("question", "condition")


def charged_ttft(calls: list[CallRecord]) -> dict:
    """id(call) -> its TTFT plus the after-first-token work of earlier calls of the same
    question and mode that it is the first to read: a reply's capture (its KV cut and its
    slot decided: `timings["capture"]`, charged to the first call reading that agent's
    reply) and contents a call encoded after its first token (`timings["encode_after"]`,
    charged to the first later call reading a question or tool result it read)."""
    out: dict = {}
    groups: OrderedDict = OrderedDict()
    for c in calls:
        if not c.shadow:
            groups.setdefault((c.question_id, c.phase, c.mode), []).append(c)
    for group in groups.values():
        replies: dict = {}    # producing agent id -> capture ms not yet charged
        contents: dict = {}   # placeholder -> encode_after ms not yet charged
        for c in group:
            extra = 0.0
            for p in c.slot_kinds or {}:
                m = _REPLY_SLOT.match(p)
                if m:
                    extra += replies.pop(m.group(1), 0.0)
                extra += contents.pop(p, 0.0)
            out[id(c)] = c.ttft_ms + extra
            t = c.timings or {}
            if t.get("capture"):
                replies[c.agent_id] = replies.get(c.agent_id, 0.0) + float(t["capture"])
            if t.get("encode_after"):
                carried = [p for p, k in (c.slot_kinds or {}).items() if k in _ENCODED_KINDS]
                if carried:
                    contents[carried[0]] = contents.get(carried[0], 0.0) + float(t["encode_after"])
    return out


def per_agent_ttft(calls: list[CallRecord], stat=statistics.median) -> "OrderedDict[str, dict]":
    """Per agent (first-seen order), `stat` over calls (median by default), in ms: dense
    prefill (`ttft_ms_dense`), dense prefill after the cached exact S0 (`ttft_ms_prefix`, when
    the paired replays timed it), KVCOMM with the charges of charged_ttft
    (`ttft_ms_kvcomm`; `_uncharged` without them) - from the paired replays when the run has
    them (identical inputs), else from the free-running KVCOMM calls. `speedup` is against
    the prefix-cached baseline when it was measured (`baseline` says which), else against
    dense; both ratios are kept. Also the KVCOMM TTFT of reuse-path calls alone, the reuse
    rate, paths and call counts of the timed KVCOMM calls."""
    charged = charged_ttft(calls)
    timed = PAIRED if any(c.mode == PAIRED for c in calls) else KVCOMM
    by_agent: OrderedDict[str, dict[str, list[CallRecord]]] = OrderedDict()
    for c in calls:
        if c.shadow or c.mode not in (DENSE, timed):
            continue
        by_agent.setdefault(c.agent_name, {DENSE: [], timed: []})[c.mode].append(c)
    out: OrderedDict[str, dict] = OrderedDict()
    for name, modes in by_agent.items():
        kv_calls = modes[timed]
        dense = [c.ttft_ms for c in modes[DENSE]]
        prefix = [c.prefix_ttft_ms for c in kv_calls if c.prefix_ttft_ms is not None]
        kv = [charged[id(c)] for c in kv_calls]
        kv_reuse = [charged[id(c)] for c in kv_calls if c.path == REUSE]
        kv_partial = sum(1 for c in kv_calls if c.path == PARTIAL)
        d = stat(dense) if dense else None
        p = stat(prefix) if prefix else None
        k = stat(kv) if kv else None
        base = p if p is not None else d
        out[name] = {
            "ttft_ms_dense": d, "ttft_ms_prefix": p, "ttft_ms_kvcomm": k,
            "ttft_ms_kvcomm_uncharged": stat([c.ttft_ms for c in kv_calls]) if kv_calls else None,
            "speedup": (base / k) if base is not None and k else None,
            "baseline": "prefix" if p is not None else "dense",
            "speedup_vs_dense": (d / k) if d is not None and k else None,
            "speedup_vs_prefix": (p / k) if p is not None and k else None,
            "timed": "paired" if timed == PAIRED else "free-running",
            "ttft_ms_kvcomm_reuse_only": stat(kv_reuse) if kv_reuse else None,
            "reuse_rate": _ratio(len(kv_reuse), len(kv)),
            "calls_dense": len(dense), "calls_kvcomm": len(kv),
            "paths": {REUSE: len(kv_reuse), PARTIAL: kv_partial, DENSE: len(kv) - len(kv_reuse) - kv_partial},
            "is_decision": any(c.is_decision for c in modes[DENSE] + kv_calls),
        }
    return out


def pool_stats(questions: list[QuestionRecord]) -> dict:
    """Anchor pool after the last KVCOMM question: anchors in all slots and bytes."""
    kv = [q for q in questions if q.mode == KVCOMM and q.pool_size is not None]
    if not kv:
        return {"anchors": None, "bytes": None}
    return {"anchors": kv[-1].pool_size, "bytes": kv[-1].pool_bytes}


def summarize(questions: list[QuestionRecord], phase: str = MEASURE) -> dict:
    """Every metric over the records of one phase."""
    qs = measured(questions, phase)
    calls = all_calls(qs)
    ft, ft_n = first_token_agreement(calls)
    ft_reuse, ft_reuse_n = first_token_agreement(calls, reuse_only=True)
    return {
        "phase": phase,
        "questions": len({q.question_id for q in qs}),
        "reuse_rate": reuse_rate(calls),
        "gate_refused_calls": gate_refused(calls),
        "accuracy": {DENSE: accuracy(qs, DENSE), KVCOMM: accuracy(qs, KVCOMM)},
        "score": {DENSE: mean_score(qs, DENSE), KVCOMM: mean_score(qs, KVCOMM)},
        "answer_agreement": answer_agreement(qs),
        "judge_consistency": judge_consistency(qs),
        "judge_without_choice": judge_without_choice(qs),
        "first_token_agreement": ft, "first_token_pairs": ft_n,
        "first_token_agreement_reuse": ft_reuse, "first_token_pairs_reuse": ft_reuse_n,
        "agents": per_agent_ttft(calls),
        "pool": pool_stats(questions),
        "tokens": fidelity.token_reuse(kvcomm_calls(calls)),
        "fidelity": paired_fidelity(calls),
    }


def paired_fidelity(calls: list[CallRecord]) -> dict | None:
    """Teacher-forced fidelity of the paired replays (kvcomm_app.runtime.paired), overall
    and per agent, slot kind and anchors used; None when the run had no paired replay."""
    paired = [c for c in calls if c.mode == PAIRED]
    if not paired:
        return None
    return {**fidelity.summary(paired), "agents": fidelity.by_agent(paired),
            "slot_kinds": fidelity.by_slot_kind(paired), "anchors": fidelity.by_anchors(paired),
            "paths": fidelity.by_path(paired)}
