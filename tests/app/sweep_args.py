"""Arguments of a small `kvcomm eval --sweep` for the sweep tests (GSM8K, 3 agents, 1 warm-up
question, the given grid, JSON to `out`); `name` is appended to the recorded command."""
from __future__ import annotations

from kvcomm_app import cli


def sweep_args(out, gammas: str, capacities: str, *, questions: int = 2, name: str | None = None):
    args = cli.build_parser().parse_args(
        ["eval", "--task", "gsm8k", "--agents", "3", "--questions", str(questions), "--warmup", "1", "--sweep",
         "--sweep-gammas", gammas, "--sweep-capacities", capacities, "--no-progress", "--no-judge-shadow",
         "--json", str(out)])
    args.argv = ["eval", "--sweep"] + ([name] if name else [])
    return args
