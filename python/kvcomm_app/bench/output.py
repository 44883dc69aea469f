"""What `kvcomm bench ttft` leaves behind: results/ttft/ttft-<device>.json, a PNG, a markdown table."""
from __future__ import annotations

import os

import torch

from .._fmt import ms as _ms, pct as _pct, x as _x
from ..runtime.report import fit_title

# docs/method.md, "What the paper reports" / the paper (arXiv 2510.12872): 5 fully connected agents, 512 prefix, 1K input,
# 512 output tokens, one H100, Llama-3.1-8B-Instruct. Read off the paper's figure: approximate.
PAPER = {
    "agents": 5, "prefix": 512, "input": 1024, "output": 512, "device": "H100",
    "model": "Llama-3.1-8B-Instruct", "last_agent_dense_ms": 430.0, "last_agent_kvcomm_ms": 55.0,
    "last_agent_speedup": 7.8, "first_agent_speedup": 1.11, "reuse_rate": "over 70% (70-87%)",
    "note": "approximate values from the paper's TTFT figure",
}


def device_tag(device: str) -> str:
    """The <device> of results/ttft/ttft-<device>.json: cpu, h100, h200, or cuda."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    name = torch.cuda.get_device_name(dev).lower()
    for tag in ("h100", "h200", "a100", "l40s", "l4"):
        if tag in name:
            return tag
    return "cuda"


def agents_table(doc: dict) -> str:
    """Markdown: one row per agent, tokens, dense, dense with S0 cached and KVCOMM median TTFT
    (captures charged to the first reader), speedups, reuse. Files written before the prefix
    baseline existed show '-' there and their speedup is against dense."""
    lines = ["| agent | prompt tokens (nominal) | dense TTFT ms | dense, S0 cached ms | KVCOMM TTFT ms | "
             "speedup vs S0 cached | speedup vs dense | reuse | KVCOMM reuse-path calls only: ms (vs S0 cached) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in doc["agents"]:
        r = a.get("kvcomm_reuse_only_ms")
        base = a.get("prefix_ms") if a.get("prefix_ms") is not None else a["dense_ms"]
        lines.append(f"| {a['agent']} | {a['tokens']} ({a['nominal_tokens']}) | {_ms(a['dense_ms'])} | "
                     f"{_ms(a.get('prefix_ms'))} | {_ms(a['kvcomm_ms'])} | {_x(a.get('speedup_vs_prefix'))} | "
                     f"{_x(a.get('speedup_vs_dense', _ratio(a['dense_ms'], a['kvcomm_ms'])))} | "
                     f"{_pct(a['reuse_rate'])} | {_ms(r)} ({_x(_ratio(base, r))}) |")
    return "\n".join(lines)


def _ratio(a, b):
    return None if a is None or not b else a / b


def scaling_table(doc: dict) -> str:
    key = doc["scaling"]
    lines = [f"| {key} | last agent tokens | last agent dense ms | last agent KVCOMM ms | speedup | "
             "last agent reuse | last agent reuse-path ms (speedup) | mean speedup (all agents) | reuse (all) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r, last, reuse_ms in zip(doc["rows"], _last_agents(doc), last_agent_reuse_only(doc)):
        lines.append(f"| {r[key]} | {r['last_agent_tokens']} | {_ms(r['last_agent_dense_ms'])} | "
                     f"{_ms(r['last_agent_kvcomm_ms'])} | {_x(r['last_agent_speedup'])} | "
                     f"{_pct(last.get('reuse_rate'))} | {_ms(reuse_ms)} "
                     f"({_x(_ratio(r['last_agent_dense_ms'], reuse_ms))}) | "
                     f"{_x(r['mean_speedup'])} | {_pct(r['reuse_rate'])} |")
    return "\n".join(lines)


def console_summary(doc: dict) -> str:
    s = doc["setting"]
    head = (f"kvcomm bench ttft: {s['agents']} agents, prefix {s['prefix']}, input {s['input']}, "
            f"output {s['output']} tokens; {doc['model']} on {doc['device_detail']}; "
            f"{doc['requests']} measured requests after {doc['warmup']} warm-up; one-token step: "
            f"{doc['one_token_step']}; share: {_share(doc)}")
    tail = (f"reuse rate {_pct(doc['reuse_rate'])} (warm-up {_pct(doc['warmup_reuse_rate'])}); "
            f"replies reused from the sender's cache: {_pct(doc['replies_captured'])}")
    return "\n".join([head, agents_table(doc), tail])


def _share(doc: dict) -> str:
    if doc.get("share") == "always":
        return "always (every slot with 2 candidate anchors shares: timing of the reuse path)"
    # files written before the policy was named "entropy" say "gate": the same policy
    return f"entropy threshold (gamma {doc.get('pool', {}).get('gamma', 0.3)})"


def plot_agents(doc: dict, path: str) -> None:
    """Grouped bars: median TTFT per agent, dense vs KVCOMM, speedup above each pair."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ag = doc["agents"]
    xs = list(range(len(ag)))
    dense = [a["dense_ms"] or 0.0 for a in ag]
    prefix = [a.get("prefix_ms") or 0.0 for a in ag]
    base = [p or d for p, d in zip(prefix, dense)]
    kv = [a["kvcomm_ms"] or 0.0 for a in ag]
    reuse = [a.get("kvcomm_reuse_only_ms") or 0.0 for a in ag]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(ag) + 2.5), 4.4))
    bars = [("dense prefill", dense, "#8c8c8c")]
    if any(prefix):
        bars.append(("dense, exact S0 cached (prefix caching)", prefix, "#c7a76c"))
    bars += [("KVCOMM (all calls, fallbacks included)", kv, "#1f77b4"),
             ("KVCOMM, reuse-path calls only", reuse, "#9ecae1")]
    w = 0.8 / len(bars)
    off = [(j - (len(bars) - 1) / 2) * w for j in range(len(bars))]
    for j, (label, ys, color) in enumerate(bars):
        ax.bar([x + off[j] for x in xs], ys, w, label=label, color=color)
    for x, a in zip(xs, ag):
        if a["speedup"]:
            ax.text(x + off[-2], max(dense[x], kv[x]) * 1.02, f"{a['speedup']:.1f}x", ha="center", va="bottom",
                    fontsize=9)
        if a.get("kvcomm_reuse_only_ms"):
            ax.text(x + off[-1], reuse[x] * 1.05 + 0.01 * max(dense), f"{base[x] / reuse[x]:.1f}x", ha="center",
                    va="bottom", fontsize=7, color="#3a6f9a")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"agent {a['agent']}\n{a['tokens']} tok" for a in ag], fontsize=8)
    ax.set_ylabel("median time to first token (ms)")
    ax.set_xlabel(f"reuse rate over all KVCOMM calls: {_pct(doc.get('reuse_rate'))}", fontsize=8)
    s = doc["setting"]
    fit_title(fig, ax, f"TTFT, {s['agents']} agents ({s['prefix']}/{s['input']}/{s['output']}), "
              f"{doc['model']}, {doc['device']}"
              + (", every slot shared" if doc.get("share") == "always" else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.margins(y=0.15)
    fig.tight_layout()
    _save(fig, path)


def plot_scaling(doc: dict, path: str) -> None:
    """Last agent's median TTFT, dense vs KVCOMM, against agent count or prefix length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = doc["scaling"]
    rows = doc["rows"]
    xs = [r[key] for r in rows]
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    ax.plot(xs, [r["last_agent_dense_ms"] for r in rows], "o-", color="#8c8c8c", label="dense prefill")
    ax.plot(xs, [r["last_agent_kvcomm_ms"] for r in rows], "o-", color="#1f77b4",
            label="KVCOMM (all calls, fallbacks included)")
    reuse = last_agent_reuse_only(doc)
    if any(v is not None for v in reuse):
        ax.plot(xs, [v if v is not None else float("nan") for v in reuse], "o--", color="#9ecae1",
                label="KVCOMM, reuse-path calls only")
    for x, r in zip(xs, rows):
        if r["last_agent_speedup"]:
            ax.annotate(f"{r['last_agent_speedup']:.1f}x", (x, r["last_agent_dense_ms"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if key == "prefix":
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("agents" if key == "agents" else "prefix tokens per agent")
    ax.set_ylabel("last agent's median TTFT (ms)")
    fit_title(fig, ax, f"TTFT vs {'agent count' if key == 'agents' else 'prefix length'}, {doc['model']}, "
              f"{doc['device']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    _save(fig, path)


def _last_agents(doc: dict) -> list[dict]:
    """Per scaling row, the last agent's entry in the run it came from."""
    if doc["scaling"] == "agents":
        return [doc["runs"][0]["agents"][r["agents"] - 1] for r in doc["rows"]]
    return [run["agents"][-1] for run in doc["runs"]]


def last_agent_reuse_only(doc: dict) -> list:
    """Per scaling row, the last agent's median TTFT over its reuse-path calls: the row's
    field, or (files written before the field existed) looked up in the runs."""
    return [r["last_agent_reuse_only_ms"] if "last_agent_reuse_only_ms" in r else last.get("kvcomm_reuse_only_ms")
            for r, last in zip(doc["rows"], _last_agents(doc))]


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
