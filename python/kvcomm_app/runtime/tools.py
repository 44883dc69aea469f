"""Tools that turn agent output into conditions ({condition_<id>_current}).

- `python_executor`: runs the code in the owner's reply (math programming expert) and
  reports what it printed or how it failed.
- `internal_tests`: runs each upstream writer's function against the examples in the
  HumanEval prompt's docstring (the "internal tests": the hidden tests stay hidden)
  and reports pass counts and the first failures (HumanEval test analyst).
Results are kept short: they are prompt text for every agent downstream.
"""
from __future__ import annotations

import json
import re

from .agents import Tool, ToolContext, ToolResult
from .answers import extract_code
from .sandbox import run_python

MAX_CONDITION_CHARS = 400


def _clip(text: str, limit: int = MAX_CONDITION_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit - 15].rstrip() + " ...(truncated)"


# Appended to the agent's code: when the code printed nothing (small models often compute
# a result and forget to print it), show its final simple variables, as a REPL would.
_SHOW_VARIABLES = """

def _kvcomm_show_variables():
    import sys
    if getattr(sys.stdout, "wrote", True):
        return
    shown = [(k, v) for k, v in globals().items() if not k.startswith("_")
             and type(v) in (int, float, str, bool) and len(repr(v)) <= 60]
    if shown:
        sys.__stdout__.write("@@VARS@@" + ", ".join(f"{k} = {v!r}" for k, v in shown[-6:]) + "\\n")
_kvcomm_show_variables()
"""

# Prepended: notes whether the code wrote anything to stdout.
_TRACK_OUTPUT = """import sys as _kvcomm_sys
class _KvcommOut:
    wrote = False
    def write(self, s):
        self.wrote = self.wrote or bool(s)
        return _kvcomm_sys.__stdout__.write(s)
    def flush(self):
        _kvcomm_sys.__stdout__.flush()
_kvcomm_sys.stdout = _KvcommOut()
"""


def describe_execution(code: str | None, timeout_s: float = 5.0) -> tuple[str, dict]:
    """Run `code`; return (condition text, details)."""
    if code is None or not code.strip():
        return "No Python code was found in the reply.", {"ran": False}
    res = run_python(_TRACK_OUTPUT + code + _SHOW_VARIABLES, timeout_s=timeout_s)
    details = {"ran": True, **res.to_dict()}
    if res.ok:
        out = res.stdout.strip()
        if out.startswith("@@VARS@@"):
            return _clip("The code printed nothing; its final variables: " + out[len("@@VARS@@"):]), details
        return (_clip(f"The code ran and printed:\n{out}") if out
                else "The code ran but printed nothing."), details
    if res.timed_out:
        return f"The code did not finish within {timeout_s:g} s.", details
    return _clip(f"The code failed: {res.error}"), details


def python_executor(timeout_s: float = 5.0) -> Tool:
    def run(ctx: ToolContext) -> ToolResult:
        text, details = describe_execution(extract_code(ctx.reply or ""), timeout_s)
        return ToolResult(text, details)
    return Tool("python_executor", "after", run)


def docstring_examples(prompt: str) -> list[tuple[str, str]]:
    """(expression, expected) pairs from '>>> expr' lines followed by an output line."""
    lines = prompt.splitlines()
    pairs = []
    for k, line in enumerate(lines):
        m = re.match(r"\s*>>>\s?(.*)$", line)
        if not m or k + 1 >= len(lines):
            continue
        expected = lines[k + 1].strip()
        if not expected or expected.startswith(">>>") or expected.startswith('"""'):
            continue
        pairs.append((m.group(1).strip(), expected))
    return pairs


_TEST_HARNESS = r'''
import json
_results = []
for _expr, _expected in json.loads(__CASES__):
    try:
        _got = eval(_expr)
        try:
            _want = eval(_expected)
            _ok = _got == _want
        except Exception:
            _ok = repr(_got) == _expected or str(_got) == _expected
        _results.append([_expr, _expected, repr(_got)[:80], bool(_ok)])
    except Exception as _e:
        _results.append([_expr, _expected, type(_e).__name__ + ": " + str(_e)[:60], False])
print("@@RESULTS@@" + json.dumps(_results))
'''


def run_examples(code: str, examples: list[tuple[str, str]], timeout_s: float = 5.0) -> dict:
    """Run `code` then the examples. Returns {passed, total, failures: [...], error}."""
    program = code + "\n" + _TEST_HARNESS.replace("__CASES__", repr(json.dumps(examples)))
    res = run_python(program, timeout_s=timeout_s)
    marker = res.stdout.rfind("@@RESULTS@@")
    if marker < 0:
        return {"passed": 0, "total": len(examples), "failures": [], "error": res.error or "no output"}
    rows = json.loads(res.stdout[marker + len("@@RESULTS@@"):].strip().splitlines()[0])
    fails = [f"{e} returned {g}, expected {w}" for e, w, g, ok in rows if not ok]
    return {"passed": sum(1 for r in rows if r[3]), "total": len(rows), "failures": fails, "error": ""}


def internal_tests(titles: dict[str, str] | None = None, timeout_s: float = 5.0) -> Tool:
    """Tool of the HumanEval test analyst: one line per upstream writer."""
    def run(ctx: ToolContext) -> ToolResult:
        problem = ctx.problem
        prompt = problem.extra["prompt"]
        entry = problem.extra["entry_point"]
        examples = docstring_examples(prompt)
        lines, details = [], {}
        for agent_id, reply in ctx.upstream.items():
            who = (titles or {}).get(agent_id, f"agent {agent_id}")
            code = completed_program(prompt, extract_code(reply, entry), entry)
            if code is None:
                lines.append(f"{who}: no code found.")
                details[agent_id] = {"code": False}
                continue
            if not examples:
                lines.append(f"{who}: the task has no examples to run.")
                continue
            r = run_examples(code, examples, timeout_s)
            details[agent_id] = r
            line = f"{who}: {r['passed']}/{r['total']} examples pass"
            if r["error"]:
                line += f" (error: {r['error']})"
            elif r["failures"]:
                line += f"; {r['failures'][0]}"
            lines.append(_clip(line, 200) + ".")
        if not lines:
            lines.append("There was no code to test.")
        return ToolResult(_clip("\n".join(lines)), details)
    return Tool("internal_tests", "before", run)


def completed_program(prompt: str, code: str | None, entry_point: str) -> str | None:
    """A runnable module defining `entry_point`: the code alone if it defines it (with the
    prompt's imports in front), else the prompt followed by the code as the body."""
    if code is None or not code.strip():
        return None
    if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        imports = "\n".join(ln for ln in prompt.splitlines()
                            if ln.startswith("import ") or ln.startswith("from "))
        return imports + "\n" + code
    body = code if code.startswith((" ", "\t")) else "\n".join("    " + ln for ln in code.splitlines())
    return prompt + body


def passes_hidden_tests(problem, code: str | None, timeout_s: float = 10.0) -> bool:
    """HumanEval scoring: the program passes the task's own `check` function."""
    program = completed_program(problem.extra["prompt"], code, problem.extra["entry_point"])
    if program is None:
        return False
    program += "\n\n" + problem.extra["test"] + f"\n\ncheck({problem.extra['entry_point']})\n"
    return run_python(program, timeout_s=timeout_s).ok


def passage_retrieval() -> Tool:
    """Tool of the passage task's first reader: 'retrieves' the question's passage (the
    dataset ships it with the question) so that it enters every prompt as one shared
    slot, {condition_<reader>_current}, as a retrieved document does in a RAG pipeline."""
    def run(ctx: ToolContext) -> ToolResult:
        extra = ctx.problem.extra
        title = extra.get("title", "")
        text = f"{title}\n{extra['passage']}" if title else extra["passage"]
        return ToolResult(text, {"chars": len(text)})
    return Tool("passage_retrieval", "before", run, label="Retrieved passage")
