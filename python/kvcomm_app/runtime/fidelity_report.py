"""Printing and filing the paired (teacher-forced) fidelity of a run.

format_fidelity: the table `kvcomm demo/eval --paired` prints. fidelity_entry: one run's
entry of results/fidelity.json (the headline numbers with their intervals, per agent and
per slot kind, the command and commit); update_fidelity_file: adds or replaces it there,
keyed by the run's task, graph, questions and settings.
"""
from __future__ import annotations

import hashlib
import json
import os

from .._fmt import pct
from .fidelity import rate


def _pct(v) -> str:
    return pct(v, 1)


def _rate(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "-"
    ci = r.get("ci95")
    n = r["n"]
    n = f"{n:.0f}" if isinstance(n, float) else n
    return f"{_pct(r['rate'])} of {n}" + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")


def _ci(ci) -> str:
    return f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def _kl(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_fidelity(f: dict) -> str:
    head = ("Paired calls (teacher-forced: identical inputs, the dense reply fed to both caches), "
            f"{f['calls']} reuse/partial calls; 95% intervals by a bootstrap over questions:")
    out = [head,
           f"  first-token agreement  {_rate(f['first_token_agreement'])}   mean KL {_kl(f['first_token_kl'])}"
           f"{_ci(f.get('first_token_kl_ci95'))} (median {_kl(f.get('first_token_kl_median'))})",
           f"  32-token agreement     {_rate(f['tf32_agreement'])} positions   mean KL {_kl(f['tf32_kl'])}"
           f"{_ci(f.get('tf32_kl_ci95'))}",
           f"  token reuse            {_rate(f['token_reuse'])} tokens after S0 the model did not compute "
           f"(every forward counted); excluding encodings {_rate(f.get('token_reuse_excluding_encodings'))}"]
    for title, groups in (("path", f.get("paths")), ("agent", f.get("agents")), ("slot kind read", f.get("slot_kinds")),
                          ("fewest anchors", f.get("anchors"))):
        if not groups:
            continue
        rows = [(title, "calls", "first token", "KL", "32-token", "token reuse")]
        for name, g in groups.items():
            rows.append((name, str(g["calls"]), _pct(g["first_token_agreement"]["rate"]), _kl(g["first_token_kl"]),
                         _pct(g["tf32_agreement"]["rate"]), _pct(g["token_reuse"]["rate"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out.append("")
        out += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                for r in rows]
    return "\n".join(out)


def accuracy_rates(questions, mode: str) -> dict:
    qs = [q for q in questions if q.mode == mode and q.phase == "measure"]
    return rate(sum(1 for q in qs if q.correct), len(qs))


def score_mean(questions, mode: str) -> dict | None:
    """Mean graded score (F1) with a normal-approximation 95% interval; None without scores."""
    xs = [q.score for q in questions if q.mode == mode and q.phase == "measure" and q.score is not None]
    if not xs:
        return None
    n = len(xs)
    m = sum(xs) / n
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    half = 1.959963984540054 * sd / n ** 0.5
    return {"mean": m, "n": n, "ci95": [round(max(0.0, m - half), 4), round(min(1.0, m + half), 4)]}


def dense_digest(records) -> str:
    """A digest of the measured dense calls (agent, round, inputs, reply): runs whose
    digests match replayed identical calls."""
    h = hashlib.sha1()
    for q in records:
        if q.mode != "dense" or q.phase != "measure":
            continue
        for c in q.calls:
            h.update(f"{q.question_id}|{c.agent_id}|{c.round}|{c.inputs_digest}|{c.first_token_id}|{c.text}\n"
                     .encode("utf-8"))
    return h.hexdigest()


# What the entries' token_reuse counts (entries without this key count the prompt forward
# only in token_reuse, and the encodings too in token_reuse_with_encoding).
ACCOUNTING = "every token the model ran: prompt forward, content encodings, probe at its share of layers"
INTERVALS = "percentile bootstrap over questions"


def fidelity_entry(res, *, command: str, commit: str | None) -> dict:
    """results/fidelity.json's entry for one experiment result (runtime.session)."""
    cfg, s = res.config, res.summary
    f = s.get("fidelity") or {}
    entry = {
        "task": cfg.task, "agents": cfg.n_agents, "topology": cfg.topology, "questions": s["questions"],
        "offset": cfg.offset, "warmup": cfg.warmup, "max_new_tokens": cfg.max_new_tokens,
        "recompute": cfg.recompute, "partial": cfg.partial, "estimator": getattr(cfg, "estimator", "anchors"),
        "method": getattr(cfg, "method", None), "pool": dict(cfg.pool),
        # None: the engine's default (kvcomm.plan.defaults)
        "head_share": getattr(cfg, "head_share", None), "estimate_anchors": getattr(cfg, "estimate_anchors", None),
        "pool_path": cfg.pool_path, "model": res.model_name, "device": res.device_detail,
        "commit": commit, "command": command, "run_s": round(res.run_s, 1),
        "accounting": ACCOUNTING, "intervals": INTERVALS,
        "dense_digest": dense_digest(res.records),
        "first_token_agreement": f.get("first_token_agreement"),
        "first_token_kl": f.get("first_token_kl"),
        "first_token_kl_ci95": f.get("first_token_kl_ci95"),
        "tf32_agreement": f.get("tf32_agreement"),
        "tf32_kl": f.get("tf32_kl"),
        "tf32_kl_ci95": f.get("tf32_kl_ci95"),
        "paired_calls": f.get("calls"),
        "token_reuse": f.get("token_reuse"),
        "token_reuse_excluding_encodings": f.get("token_reuse_excluding_encodings"),
        "compute": f.get("compute"),
        "call_reuse": f.get("call_reuse"),
        "call_reuse_or_partial": f.get("call_reuse_or_partial"),
        "free_running": s.get("tokens"),
        "accuracy": {"dense": accuracy_rates(res.records, "dense"),
                     "kvcomm": accuracy_rates(res.records, "kvcomm") if cfg.free else None},
        "f1": {"dense": score_mean(res.records, "dense"),
               "kvcomm": score_mean(res.records, "kvcomm") if cfg.free else None},
        "answer_agreement": s.get("answer_agreement"),
        "per_path": {k: _short(v) for k, v in (f.get("paths") or {}).items()},
        "per_agent": {k: _short(v) for k, v in (f.get("agents") or {}).items()},
        "per_slot_kind": {k: _short(v) for k, v in (f.get("slot_kinds") or {}).items()},
        "by_anchors": {k: _short(v) for k, v in (f.get("anchors") or {}).items()},
        "final_pool": _final_pool(res.records),
        "ttft": {name: {k: a.get(k) for k in ("ttft_ms_dense", "ttft_ms_prefix", "ttft_ms_kvcomm",
                                              "ttft_ms_kvcomm_uncharged", "speedup_vs_dense", "speedup_vs_prefix",
                                              "timed", "calls_kvcomm")}
                 for name, a in (s.get("agents") or {}).items()},
    }
    return entry


def _final_pool(records) -> dict | None:
    """The replay engine's pool after the last paired question: anchors and stored bytes."""
    paired = [q for q in records if q.mode == "paired" and q.pool_size is not None]
    return {"anchors": paired[-1].pool_size, "bytes": paired[-1].pool_bytes} if paired else None


def _short(g: dict) -> dict:
    return {k: g.get(k) for k in ("calls", "first_token_agreement", "first_token_kl", "first_token_kl_ci95",
                                  "tf32_agreement", "tf32_kl", "token_reuse")}


def _key(e: dict) -> tuple:
    return (e["task"], e["agents"], e["topology"], e["questions"], e["offset"], e["recompute"],
            e["partial"], json.dumps(e["pool"], sort_keys=True), e["max_new_tokens"], e.get("estimator", "anchors"),
            e.get("head_share"), e.get("estimate_anchors"))


def update_fidelity_file(path: str, entry: dict) -> None:
    """Adds `entry` to the runs in `path` (a JSON object with a "runs" list), replacing a
    run with the same task, graph, questions and settings."""
    doc = {"runs": []}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    runs = [r for r in doc.get("runs", []) if _key(r) != _key(entry)]
    runs.append(entry)
    doc["runs"] = runs
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)
