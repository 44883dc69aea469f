"""What the recorded teams (autogen_team.py, langgraph_team.py) share: the agents' prompts, the
task wording, the `lookup` tool's function, the command line and the recording proxy's marks.
Stdlib only: it is imported in each framework's own environment."""
from __future__ import annotations

import argparse
import json
import os
import urllib.request
from typing import Literal

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TASKS = os.path.join(HERE, "..", "..", "tests", "fixtures", "chat", "tasks.json")
MODEL = "SmolLM2-135M-Instruct"

# Each agent's system message (tests/app/test_chat_fixtures.py recognizes the agents by them).
SYSTEM = {
    "solver": "You are the solver in a team of three agents. Solve the user's task. Be brief.",
    "critic": "You are the critic in a team of three agents. Check the solver's answer against the task "
              "and point out any mistake in one or two sentences.",
    "summarizer": "You are the summarizer in a team of three agents. Give the team's final answer in one "
                  "sentence.",
}


def task_text(task: dict) -> str:
    """The task message a team starts from."""
    if task["kind"] == "squad":
        return (f"Read the passage and answer the question.\n\nPassage ({task['title']}):\n{task['passage']}"
                f"\n\nQuestion: {task['question']}")
    if task["kind"] == "gsm8k":
        return f"Solve the problem. End with 'Answer: <number>'.\n\nProblem: {task['question']}"
    return f"Use the lookup tool on the topic \"{task['topic']}\", then answer the question.\n\nQuestion: {task['question']}"


def lookup_function(texts: dict):
    """The `lookup` tool as a plain function, for a framework to wrap (its docstring and type
    hints become the tool's schema)."""
    def lookup(topic: str) -> str:
        """Look up reference text about a topic."""
        for name, text in texts.items():
            if name.lower() in topic.lower() or topic.lower() in name.lower():
                return text
        return f"No entry for {topic!r}."
    # topic: one of the known topics (a JSON schema enum or const), so that the server's
    # constrained decoding of the forced call yields a topic the tool has, not free text that
    # runs past max_tokens
    lookup.__annotations__["topic"] = Literal[tuple(texts)]
    return lookup


def parser(description: str, stream_help: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8100/v1")
    ap.add_argument("--api-key", default="sk-anything", help="any string; the server does not check it")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--only", type=int, nargs="*", help="task indices to run (default: all)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the three agents (default 1)")
    ap.add_argument("--first-conversation", type=int, default=0, help="number of the first conversation")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--stream", action="store_true", help=stream_help)
    ap.add_argument("--record", default=None, help="the recording proxy's root URL, e.g. http://127.0.0.1:8200")
    return ap


def load_tasks(args) -> tuple[list[dict], dict]:
    """(the tasks --only picks, in order; the lookup tool's texts by topic)."""
    with open(args.tasks) as f:
        data = json.load(f)
    tasks = data["tasks"]
    return ([tasks[i] for i in args.only] if args.only else tasks), data["lookup"]


def mark(record_url: str | None, labels: dict) -> None:
    """Tells the recording proxy which conversation the next calls belong to (out of band: the
    framework's own requests stay as they are)."""
    if record_url:
        req = urllib.request.Request(record_url.rstrip("/") + "/_record/conversation", json.dumps(labels).encode(),
                                     {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
