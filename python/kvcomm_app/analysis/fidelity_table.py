"""Markdown tables of results/quality/fidelity.json (the runs of `kvcomm eval --paired
--fidelity-json`): one row per run, the headline numbers with their 95% intervals.

    python -m kvcomm_app.analysis.fidelity_table results/quality/fidelity.json [--task TASK]
"""
from __future__ import annotations

import argparse
import json
import sys


def _pct(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "-"
    ci = r.get("ci95")
    return f"{100 * r['rate']:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _kl(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _acc(run: dict) -> str:
    f1 = run.get("f1") or {}
    if f1.get("dense"):
        k = f1.get("kvcomm")
        return f"F1 {100 * f1['dense']['mean']:.1f} / " + (f"{100 * k['mean']:.1f}" if k else "-")
    acc = run.get("accuracy") or {}
    d, k = acc.get("dense"), acc.get("kvcomm")
    return f"{_pct(d).split(' ')[0]} / {_pct(k).split(' ')[0] if k else '-'}"


def honest_reuse(run: dict) -> tuple:
    """(tokens reused counting every forward, the same without content encodings). Entries
    written before the accounting changed (no "accounting" key) named these
    token_reuse_with_encoding and token_reuse."""
    if run.get("accounting"):
        return run.get("token_reuse"), run.get("token_reuse_excluding_encodings")
    return run.get("token_reuse_with_encoding"), run.get("token_reuse")


def setting(run: dict) -> str:
    pool = run.get("pool") or {}
    return f"m={pool.get('min_anchors', 2)}, {run.get('recompute') or 'none'}" + ("" if run.get("partial", True) else ", no partial")


def table(runs: list[dict]) -> str:
    rows = ["| task | agents | questions | setting | paired calls | first-token agreement | first-token KL "
            "| 32-token agreement | 32-token KL | tokens after S0 reused | excluding encodings | calls reuse / partial "
            "| accuracy dense / kvcomm |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        cr, crp = r.get("call_reuse") or {}, r.get("call_reuse_or_partial") or {}
        calls = "-" if cr.get("rate") is None else f"{100 * cr['rate']:.0f}% / {100 * ((crp.get('rate') or 0) - cr['rate']):.0f}%"
        reuse, excl = honest_reuse(r)
        rows.append(f"| {r['task']} | {r['agents']} | {r['questions']} | {setting(r)} | {r.get('paired_calls')} "
                    f"| {_pct(r.get('first_token_agreement'))} | {_kl(r.get('first_token_kl'))} "
                    f"| {_pct(r.get('tf32_agreement'))} | {_kl(r.get('tf32_kl'))} | {_pct(reuse)} | {_pct(excl)} "
                    f"| {calls} | {_acc(r)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--task", default=None, help="only runs of this task")
    args = ap.parse_args(argv)
    with open(args.path, encoding="utf-8") as fh:
        runs = json.load(fh)["runs"]
    if args.task:
        runs = [r for r in runs if r["task"] == args.task]
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
