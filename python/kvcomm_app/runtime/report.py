"""Turning a metrics summary into the table people read, the JSON tools read, a plot."""
from __future__ import annotations

import json
import os
import textwrap
from functools import partial

from .._fmt import ms as _ms, pct, x as _x

_pct = partial(pct, digits=1)


def format_table(summary: dict, warmup: dict | None = None, title: str | None = None) -> str:
    """Per agent: KVCOMM path counts, median TTFT dense, dense with S0 cached and KVCOMM,
    speedups; then totals."""
    rows = [("agent", "reuse/partial/dense", "TTFT dense ms", "dense+S0 ms", "TTFT kvcomm ms",
             "speedup vs dense+S0", "speedup vs dense", "reuse-only ms")]
    for name, a in summary["agents"].items():
        label = f"{name} (decision)" if a.get("is_decision") and "decision" not in name else name
        p = a["paths"]
        rows.append((label, f"{p['reuse']}/{p.get('partial', 0)}/{p['dense']}", _ms(a["ttft_ms_dense"]),
                     _ms(a.get("ttft_ms_prefix")), _ms(a["ttft_ms_kvcomm"]), _x(a.get("speedup_vs_prefix")),
                     _x(a.get("speedup_vs_dense", a.get("speedup"))), _ms(a["ttft_ms_kvcomm_reuse_only"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    out = []
    if title:
        out.append(title)
    out.append(line(rows[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in rows[1:])
    acc = summary["accuracy"]
    ft = summary["first_token_agreement"]
    out += [
        "",
        f"questions measured      {summary['questions']}",
        f"reuse rate              {_pct(summary['reuse_rate'])}  (KVCOMM calls on the reuse path)",
        f"accuracy                dense {_pct(acc['dense'])}   kvcomm {_pct(acc['kvcomm'])}"
        + (f"   (score, e.g. F1: dense {_pct(summary['score']['dense'])}   kvcomm "
           f"{_pct(summary['score']['kvcomm'])})" if (summary.get('score') or {}).get('dense') is not None else ""),
        f"answer agreement        {_pct(summary['answer_agreement'])}  (KVCOMM final answer = dense final answer)",
        f"judge consistency       {_pct(summary['judge_consistency'])}  (decision agent's choice, KVCOMM vs dense, same inputs"
        + (f"; {summary['judge_without_choice']} with no choice either way)" if summary.get("judge_without_choice")
           else ")"),
        f"first-token agreement   {_pct(ft)} over {summary['first_token_pairs']} calls with identical inputs"
        + (f"; reuse-path calls {_pct(summary['first_token_agreement_reuse'])} of "
           f"{summary['first_token_pairs_reuse']}" if summary.get("first_token_pairs_reuse") else ""),
    ]
    tokens = summary.get("tokens") or {}
    if tokens.get("kvcomm_calls"):
        out.append(f"token reuse             {_pct(tokens['token_reuse']['rate'])} of the prompt tokens after "
                   f"the exact prefix not computed by the model (every forward counted; "
                   f"{_pct(tokens['token_reuse_excluding_encodings']['rate'])} excluding content encodings); "
                   f"partial calls {tokens['paths']['partial']} of {tokens['kvcomm_calls']} (free-running run)")
    pool = summary.get("pool") or {}
    if pool.get("anchors") is not None:
        out.append(f"anchor pool             {pool['anchors']} anchors, {pool['bytes'] / 2**20:.1f} MiB")
    if warmup is not None and warmup.get("questions"):
        out.append(f"warm-up (not above)     {warmup['questions']} questions, reuse rate "
                   f"{_pct(warmup['reuse_rate'])} while the pool filled")
    timed = next((a.get("timed") for a in summary["agents"].values() if a.get("calls_kvcomm")), None)
    out.append("TTFT = median time to first token of each agent call: encoding inputs, deciding, estimating, "
               "the forward; a reply's capture (KV cut + slot decision, after its producer's first token) "
               "is charged to its first reader; kvcomm counts dense fallbacks too. dense+S0 = dense prefill "
               "with the agent's exact prefix cached (prefix caching)."
               + (" KVCOMM timed on the paired replays (the dense run's exact inputs)." if timed == "paired" else
                  " KVCOMM timed on the free-running run (its own replies as inputs)." if timed else ""))
    if summary.get("fidelity"):
        from .fidelity_report import format_fidelity
        out += ["", format_fidelity(summary["fidelity"])]
    return "\n".join(out)


def summary_json(summary: dict, *, model: str, device: str, warmup: dict | None = None,
                 extra: dict | None = None) -> dict:
    """The --json document: the headline fields at the top, details after."""
    doc = {
        "model": model,
        "device": device,
        "questions": summary["questions"],
        "reuse_rate": summary["reuse_rate"],
        "accuracy": dict(summary["accuracy"]),
        "answer_agreement": summary["answer_agreement"],
        "judge_consistency": summary["judge_consistency"],
        "judge_without_choice": summary.get("judge_without_choice"),
        "agents": [{"name": name, "ttft_ms_dense": a["ttft_ms_dense"], "ttft_ms_prefix": a.get("ttft_ms_prefix"),
                    "ttft_ms_kvcomm": a["ttft_ms_kvcomm"], "speedup": a["speedup"],
                    "baseline": a.get("baseline"), "speedup_vs_dense": a.get("speedup_vs_dense"),
                    "speedup_vs_prefix": a.get("speedup_vs_prefix"),
                    "ttft_ms_kvcomm_uncharged": a.get("ttft_ms_kvcomm_uncharged"), "timed": a.get("timed"),
                    "reuse_rate": a["reuse_rate"],
                    "ttft_ms_kvcomm_reuse_only": a["ttft_ms_kvcomm_reuse_only"],
                    "paths": a["paths"], "is_decision": a["is_decision"]}
                   for name, a in summary["agents"].items()],
        "first_token_agreement": summary["first_token_agreement"],
        "first_token_pairs": summary["first_token_pairs"],
        "pool": summary.get("pool"),
        "tokens": summary.get("tokens"),
        "fidelity": summary.get("fidelity"),
        "ttft_statistic": "median",
    }
    if warmup is not None:
        doc["warmup"] = {"questions": warmup["questions"], "reuse_rate": warmup["reuse_rate"]}
    if extra:
        doc.update(extra)
    return doc


def write_json(doc: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def fit_title(fig, ax, title: str, fontsize: float = 11):
    """Sets ax's title wrapped to the figure's width (a long one-line title ran off
    both sides of the image); tight_layout then makes room for its lines."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))   # ~0.6 em per character
    return ax.set_title(textwrap.fill(title, chars), fontsize=fontsize)


def plot_ttft(summary: dict, path: str, title: str = "Time to first token per agent") -> None:
    """Grouped bars: dense vs KVCOMM median TTFT per agent, speedup written above."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["agents"])
    dense = [summary["agents"][n]["ttft_ms_dense"] or 0.0 for n in names]
    prefix = [summary["agents"][n].get("ttft_ms_prefix") or 0.0 for n in names]
    kv = [summary["agents"][n]["ttft_ms_kvcomm"] or 0.0 for n in names]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(names) + 2), 4.0))
    bars = [("dense prefill", dense, "#8c8c8c")]
    if any(prefix):
        bars.append(("dense, exact S0 cached", prefix, "#c7a76c"))
    bars.append(("KVCOMM", kv, "#1f77b4"))
    w = 0.8 / len(bars)
    for j, (label, ys, color) in enumerate(bars):
        ax.bar([x + (j - (len(bars) - 1) / 2) * w for x in xs], ys, w, label=label, color=color)
    for x, n in zip(xs, names):
        s = summary["agents"][n]["speedup"]
        if s:
            ax.text(x, max(dense[x], prefix[x], kv[x]) * 1.02, f"{s:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylabel("median TTFT (ms)")
    fit_title(fig, ax, title)
    ax.legend()
    ax.margins(y=0.15)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
