"""The Pareto comparison: fidelity against the share of the prompt the model computed, per
method, on identical calls (results/quality/pareto.json and its plot).

Input: fidelity files written by `kvcomm eval --paired --fidelity-json` runs whose paired
variants are named methods (`--paired-variant "method=cacheblend:0.15"`, kvcomm.plan.methods);
the run's own replay is KVCOMM at its settings. Runs of one task and graph may be split
over several invocations (a run must stay short on this machine): their entries are joined
when their dense runs are identical (the same `dense_digest`: same questions, inputs and
replies), and refused otherwise.

Per (task, agents) and method point: the share of the tokens after S0 the model computed
(every forward counted: prompt, content encodings, the probe at its share of layers), the
first-token agreement with its bootstrap interval, first-token KL, 32-token agreement and
KL, reuse-only and partial-call agreement, and the median TTFT per agent on the paired
(identical-input) calls beside dense prefill and dense prefill after the cached exact S0.

    python -m kvcomm_app.analysis.pareto results/quality/pareto-runs/*-[35]a.json \\
        --json results/quality/pareto.json --plot results/quality/pareto.png
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict

FAMILIES = ("kvcomm", "hybrid-deviation", "hybrid-spread", "fit", "fit-deviation", "anchors-or-base",
            "anchors-or-base-deviation", "cacheblend", "epic", "prefix")
COLORS = {"kvcomm": "#1f77b4", "hybrid-deviation": "#d62728", "hybrid-spread": "#ff7f0e", "fit": "#9467bd",
          "fit-deviation": "#8c564b", "anchors-or-base": "#e377c2", "anchors-or-base-deviation": "#bcbd22",
          "cacheblend": "#2ca02c", "epic": "#17becf", "prefix": "#7f7f7f"}
TARGET_AGREEMENT, TARGET_KL, TARGET_REUSE = 0.98, 0.01, 0.80


def method_of(entry: dict) -> str:
    """The entry's method name ('cacheblend:0.15'); a run's own replay without one is named
    from its settings ('kvcomm' at the defaults)."""
    if entry.get("method"):
        return entry["method"]
    est, rec = entry.get("estimator", "anchors"), entry.get("recompute") or "none"
    if est == "anchors" and rec == "none":
        return "kvcomm"
    return f"{est}/{rec}"


def family_budget(method: str) -> tuple[str, float | None]:
    name, _, value = method.partition(":")
    try:
        return name, float(value) if value else None
    except ValueError:
        return name, None


def _rate(r: dict | None):
    return None if not r else r.get("rate")


def point(entry: dict) -> dict:
    """One method's numbers from its fidelity entry."""
    method = method_of(entry)
    fam, budget = family_budget(method)
    compute = entry.get("compute") or {}
    paths = entry.get("per_path") or {}
    ttft = entry.get("ttft") or {}
    kv = {a: t.get("ttft_ms_kvcomm") for a, t in ttft.items()}
    return {
        "method": method, "family": fam, "budget": budget,
        "estimator": entry.get("estimator", "anchors"), "recompute": entry.get("recompute"),
        "pool": entry.get("pool"), "paired_calls": entry.get("paired_calls"),
        "compute_share": compute.get("share"), "compute": compute,
        "token_reuse": entry.get("token_reuse"),
        "token_reuse_excluding_encodings": entry.get("token_reuse_excluding_encodings"),
        "first_token_agreement": entry.get("first_token_agreement"),
        "first_token_kl": entry.get("first_token_kl"), "first_token_kl_ci95": entry.get("first_token_kl_ci95"),
        "tf32_agreement": entry.get("tf32_agreement"), "tf32_kl": entry.get("tf32_kl"),
        "tf32_kl_ci95": entry.get("tf32_kl_ci95"),
        "reuse_path": paths.get("reuse"), "partial_path": paths.get("partial"),
        "call_paths": {k: (v or {}).get("calls") for k, v in paths.items()},
        "ttft_ms_median": kv,
        "ttft_ms_sum_of_medians": sum(x for x in kv.values() if x is not None) if kv else None,
        "final_pool": entry.get("final_pool"),
        "commit": entry.get("commit"), "command": entry.get("command"), "run_s": entry.get("run_s"),
    }


def baselines(entries: list[dict]) -> dict:
    """Per agent median TTFT of dense prefill and of dense prefill after the cached S0 (the
    own replays time them on the same calls)."""
    for e in entries:
        ttft = e.get("ttft") or {}
        if any(t.get("ttft_ms_prefix") is not None for t in ttft.values()):
            return {"dense": {a: t.get("ttft_ms_dense") for a, t in ttft.items()},
                    "prefix": {a: t.get("ttft_ms_prefix") for a, t in ttft.items()}}
    return {}


def group(entries: list[dict]) -> "OrderedDict[tuple, list]":
    """Entries by (task, agents); ValueError when one group's dense runs differ."""
    out: OrderedDict = OrderedDict()
    for e in entries:
        out.setdefault((e["task"], e["agents"]), []).append(e)
    for key, es in out.items():
        digests = {e.get("dense_digest") for e in es}
        if len(digests) != 1 or None in digests:
            raise ValueError(f"{key}: the runs replayed different dense calls (dense_digest {sorted(map(str, digests))});"
                             " compare methods only on identical calls")
        qs = {e["questions"] for e in es}
        if len(qs) != 1:
            raise ValueError(f"{key}: runs of different sizes {sorted(qs)}")
    return out


def frontier(points: list[dict], metric: str, higher: bool) -> list[dict]:
    """The points no other point beats on both compute share (lower) and `metric`."""
    def val(p):
        v = p[metric]
        return v.get("rate") if isinstance(v, dict) else v
    pts = [p for p in points if p["compute_share"] is not None and val(p) is not None]
    keep = []
    for p in pts:
        dominated = any(q is not p and q["compute_share"] <= p["compute_share"] and
                        (val(q) >= val(p) if higher else val(q) <= val(p)) and
                        (q["compute_share"] < p["compute_share"] or val(q) != val(p)) for q in pts)
        if not dominated:
            keep.append(p)
    return sorted(keep, key=lambda p: p["compute_share"])


def targets(points: list[dict]) -> dict:
    """Per family: the best agreement / KL among points with >= 80% reuse, and the highest
    reuse among points meeting 98% agreement and KL <= 0.01."""
    out = {}
    for fam in sorted({p["family"] for p in points}):
        ps = [p for p in points if p["family"] == fam and _rate(p["token_reuse"]) is not None]
        at80 = [p for p in ps if _rate(p["token_reuse"]) >= TARGET_REUSE]
        good = [p for p in ps if (_rate(p["first_token_agreement"]) or 0) >= TARGET_AGREEMENT
                and p["first_token_kl"] is not None and p["first_token_kl"] <= TARGET_KL]
        best80 = max(at80, key=lambda p: (_rate(p["first_token_agreement"]) or 0, -(p["first_token_kl"] or 9)),
                     default=None)
        out[fam] = {
            "best_at_80pct_reuse": None if best80 is None else {
                "method": best80["method"], "token_reuse": _rate(best80["token_reuse"]),
                "first_token_agreement": _rate(best80["first_token_agreement"]),
                "first_token_kl": best80["first_token_kl"]},
            "lowest_kl_at_80pct_reuse": None if not at80 else min(p["first_token_kl"] for p in at80),
            "best_reuse_meeting_98pct_and_kl_0.01": None if not good else max(
                _rate(p["token_reuse"]) for p in good),
            "met": any(_rate(p["token_reuse"]) >= TARGET_REUSE for p in good),
        }
    return out


OURS = ("kvcomm", "hybrid-deviation", "anchors-or-base", "anchors-or-base-deviation", "fit", "fit-deviation",
        "hybrid-spread")


def _interpolate(points: list[dict], share: float, value) -> float | None:
    """value(p) of the family's points, linear in compute share between the two points that
    bracket `share`; None outside their range."""
    pts = sorted((p for p in points if p["compute_share"] is not None and value(p) is not None),
                 key=lambda p: p["compute_share"])
    for lo, hi in zip(pts, pts[1:]):
        if lo["compute_share"] <= share <= hi["compute_share"]:
            span = hi["compute_share"] - lo["compute_share"]
            t = 0.0 if span == 0 else (share - lo["compute_share"]) / span
            return value(lo) + t * (value(hi) - value(lo))
    if pts and abs(pts[0]["compute_share"] - share) < 1e-9:
        return value(pts[0])
    return None


def head_to_head(points: list[dict], theirs: str = "cacheblend") -> list[dict]:
    """Each anchor-based point against CacheBlend at the same share of computed tokens (its
    measured points interpolated linearly; a point outside CacheBlend's measured range is
    left out): the differences ours - theirs in first-token agreement, first-token KL and
    32-token KL, and which wins (lower first-token KL)."""
    ref = [p for p in points if p["family"] == theirs]
    rows = []
    for p in points:
        if p["family"] not in OURS or p["compute_share"] is None or p["first_token_kl"] is None:
            continue
        share = p["compute_share"]
        kl = _interpolate(ref, share, lambda q: q["first_token_kl"])
        if kl is None:
            continue
        agree = _interpolate(ref, share, lambda q: _rate(q["first_token_agreement"]))
        tkl = _interpolate(ref, share, lambda q: q["tf32_kl"])
        mine = _rate(p["first_token_agreement"])
        rows.append({"method": p["method"], "compute_share": share, "theirs": theirs,
                     "theirs_first_token_kl": kl, "theirs_first_token_agreement": agree,
                     "winner": p["method"] if p["first_token_kl"] < kl else theirs,
                     "first_token_agreement_diff": None if mine is None or agree is None else mine - agree,
                     "first_token_kl_diff": p["first_token_kl"] - kl,
                     "first_token_kl_ratio": p["first_token_kl"] / kl if kl else None,
                     "tf32_kl_diff": None if p["tf32_kl"] is None or tkl is None else p["tf32_kl"] - tkl})
    return rows


def build(entries: list[dict]) -> dict:
    configs = []
    for (task, agents), es in group(entries).items():
        points = sorted((point(e) for e in es), key=lambda p: (FAMILIES.index(p["family"])
                                                                 if p["family"] in FAMILIES else 99,
                                                                 p["budget"] or 0.0))
        configs.append({
            "task": task, "agents": agents, "questions": es[0]["questions"], "warmup": es[0].get("warmup"),
            "max_new_tokens": es[0].get("max_new_tokens"), "dense_digest": es[0].get("dense_digest"),
            "model": es[0].get("model"), "device": es[0].get("device"),
            "ttft_baselines_ms_median": baselines(es),
            "points": points,
            "frontier_first_token_kl": [p["method"] for p in frontier(points, "first_token_kl", higher=False)],
            "frontier_first_token_agreement": [p["method"] for p in frontier(points, "first_token_agreement",
                                                                             higher=True)],
            "targets": targets(points),
            "head_to_head": head_to_head(points),
        })
    return {"configs": configs,
            "x": "share of the prompt tokens after the exact prefix S0 the model computed, every forward counted "
                 "(prompt, content encodings, the deviation probe at its share of layers)",
            "intervals": "percentile bootstrap over questions (95%)",
            "targets": {"first_token_agreement": TARGET_AGREEMENT, "first_token_kl": TARGET_KL,
                        "token_reuse": TARGET_REUSE}}


def table(doc: dict) -> str:
    """Markdown, one row per config and method."""
    rows = ["| task | agents | method | computed | token reuse | first-token agreement | first-token KL | "
            "32-token agreement | 32-token KL | reuse-path / partial agreement | TTFT sum of agent medians ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(r):
        if not r or r.get("rate") is None:
            return "-"
        ci = r.get("ci95")
        return f"{100 * r['rate']:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    def short(r):
        return "-" if not r or r.get("rate") is None else f"{100 * r['rate']:.1f}%"

    for c in doc["configs"]:
        for p in c["points"]:
            kl = "-" if p["first_token_kl"] is None else f"{p['first_token_kl']:.4f}"
            tkl = "-" if p["tf32_kl"] is None else f"{p['tf32_kl']:.4f}"
            paths = (f"{short((p['reuse_path'] or {}).get('first_token_agreement'))} / "
                     f"{short((p['partial_path'] or {}).get('first_token_agreement'))}")
            share = "-" if p["compute_share"] is None else f"{100 * p['compute_share']:.1f}%"
            ttft = "-" if p["ttft_ms_sum_of_medians"] is None else f"{p['ttft_ms_sum_of_medians']:.0f}"
            rows.append(f"| {c['task']} | {c['agents']} | {p['method']} | {share} | {pct(p['token_reuse'])} | "
                        f"{pct(p['first_token_agreement'])} | {kl} | {pct(p['tf32_agreement'])} | {tkl} | "
                        f"{paths} | {ttft} |")
    rows += ["", "Against CacheBlend at the same computed share (its points interpolated):", "",
             "| task | agents | method | computed | winner (first-token KL) | KL ours / CacheBlend's | "
             "agreement diff (points) | 32-token KL diff |", "|---|---|---|---|---|---|---|---|"]
    for c in doc["configs"]:
        for h in c.get("head_to_head") or []:
            agree = "-" if h["first_token_agreement_diff"] is None else f"{100 * h['first_token_agreement_diff']:+.1f}"
            ratio = "-" if h["first_token_kl_ratio"] is None else f"{h['first_token_kl_ratio']:.2f}x"
            tkl = "-" if h["tf32_kl_diff"] is None else f"{h['tf32_kl_diff']:+.4f}"
            rows.append(f"| {c['task']} | {c['agents']} | {h['method']} | {100 * h['compute_share']:.1f}% | "
                        f"{h['winner']} | {ratio} | {agree} | {tkl} |")
    return "\n".join(rows)


def plot(doc: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = doc["configs"]
    metrics = [("first_token_agreement", "first-token agreement", True),
               ("first_token_kl", "first-token KL (log)", False), ("tf32_agreement", "32-token agreement", True)]
    fig, axes = plt.subplots(len(metrics), len(configs), figsize=(3.6 * len(configs), 3.0 * len(metrics)),
                             squeeze=False)
    for j, c in enumerate(configs):
        for i, (key, label, is_rate) in enumerate(metrics):
            ax = axes[i][j]
            fams = OrderedDict()
            for p in c["points"]:
                fams.setdefault(p["family"], []).append(p)
            for fam, ps in fams.items():
                ps = [p for p in ps if p["compute_share"] is not None and p[key] is not None]
                ps.sort(key=lambda p: p["compute_share"])
                xs = [100 * p["compute_share"] for p in ps]
                if is_rate:
                    ys = [100 * p[key]["rate"] for p in ps]
                    err = [[100 * (p[key]["rate"] - p[key]["ci95"][0]) if p[key].get("ci95") else 0 for p in ps],
                           [100 * (p[key]["ci95"][1] - p[key]["rate"]) if p[key].get("ci95") else 0 for p in ps]]
                else:
                    ys = [p[key] for p in ps]
                    ci = [p.get(f"{key}_ci95") for p in ps]
                    err = [[y - c_[0] if c_ else 0 for y, c_ in zip(ys, ci)],
                           [c_[1] - y if c_ else 0 for y, c_ in zip(ys, ci)]]
                # (a percentile interval need not contain the point estimate: clip at 0)
                err = [[max(0.0, e) for e in side] for side in err]
                ax.errorbar(xs, ys, yerr=err, fmt="o-", ms=3.5, lw=1.2, capsize=2, elinewidth=0.7,
                            color=COLORS.get(fam, "#333333"), label=fam)
            if key == "first_token_agreement":
                ax.axhline(100 * TARGET_AGREEMENT, color="k", ls=":", lw=0.8)
            if key == "first_token_kl":
                ax.set_yscale("log")
                ax.axhline(TARGET_KL, color="k", ls=":", lw=0.8)
            ax.axvline(100 * (1 - TARGET_REUSE), color="k", ls="--", lw=0.6)
            if i == 0:
                ax.set_title(f"{c['task']}, {c['agents']} agents ({c['questions']} q)", fontsize=9)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if i == len(metrics) - 1:
                ax.set_xlabel("% of tokens after S0 computed", fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle("Fidelity vs computed share, identical paired calls (dotted: targets; dashed: 80% reused)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from .. import provenance

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="fidelity JSON files of the Pareto runs")
    ap.add_argument("--json", default=None, help="write the comparison here")
    ap.add_argument("--plot", default=None, help="write the plot (PNG) here")
    args = ap.parse_args(argv)
    entries = []
    for path in args.files:
        with open(path, encoding="utf-8") as fh:
            entries += [dict(e, source=path) for e in json.load(fh)["runs"]]
    try:
        doc = build(entries)
    except ValueError as e:
        print(f"pareto: {e}", file=sys.stderr)
        return 2
    doc.update(provenance.capture("python -m kvcomm_app.analysis.pareto", argv=argv).fields(),
               sources=sorted(set(args.files)))
    print(table(doc))
    if args.json:
        from ..runtime.report import write_json
        write_json(doc, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
