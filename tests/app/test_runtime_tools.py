"""Tools and scoring on real HumanEval problems (read from the installed package)."""
import pytest

from kvcomm_app.runtime.agents import ToolContext
from kvcomm_app.runtime.datasets import load_humaneval
from kvcomm_app.runtime.tools import (completed_program, docstring_examples, internal_tests,
                                  passes_hidden_tests, python_executor)


@pytest.fixture(scope="module")
def humaneval():
    return {p.id: p for p in load_humaneval()}


def test_python_executor_reports_output_and_errors():
    tool = python_executor(timeout_s=2)
    ok = tool.run(ToolContext(None, "2", "Here:\n```python\nprint(6 * 7)\n```", {}, 0))
    assert "42" in ok.text and ok.details["ok"]
    bad = tool.run(ToolContext(None, "2", "```python\nprint(undefined_name)\n```", {}, 0))
    assert "NameError" in bad.text and not bad.details["ok"]
    none = tool.run(ToolContext(None, "2", "I think it is 5.", {}, 0))
    assert none.text == "No Python code was found in the reply."
    slow = tool.run(ToolContext(None, "2", "```python\nwhile True: pass\n```", {}, 0))
    assert "did not finish" in slow.text


def test_docstring_examples_are_parsed(humaneval):
    ex = docstring_examples(humaneval["HumanEval/0"].extra["prompt"])
    assert ex == [("has_close_elements([1.0, 2.0, 3.0], 0.5)", "False"),
                  ("has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)", "True")]


def test_hidden_tests_accept_the_canonical_solution_and_reject_a_wrong_one(humaneval):
    for tid in ("HumanEval/0", "HumanEval/2", "HumanEval/12"):
        p = humaneval[tid]
        assert passes_hidden_tests(p, p.extra["canonical_solution"]), tid
        assert not passes_hidden_tests(p, "    return None\n"), tid
    assert not passes_hidden_tests(humaneval["HumanEval/0"], None)


def test_internal_tests_tool_reports_per_writer(humaneval):
    p = humaneval["HumanEval/0"]
    good = "```python\n" + p.extra["prompt"] + p.extra["canonical_solution"] + "```"
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"
    tool = internal_tests({"0": "Python Programmer", "1": "Algorithm Designer"}, timeout_s=5)
    res = tool.run(ToolContext(p, "2", None, {"0": good, "1": wrong, "3": "no code at all"}, 0))
    lines = res.text.splitlines()
    assert lines[0].startswith("Python Programmer: 2/2 examples pass")
    assert lines[1].startswith("Algorithm Designer: 1/2 examples pass")
    assert "returned True, expected False" in lines[1]
    assert lines[2] == "agent 3: no code found."
    assert res.details["0"]["passed"] == 2 and res.details["1"]["passed"] == 1


def test_completed_program_uses_a_body_or_a_full_function(humaneval):
    p = humaneval["HumanEval/2"]
    body = completed_program(p.extra["prompt"], "return number % 1.0", p.extra["entry_point"])
    assert body.startswith(p.extra["prompt"]) and body.endswith("    return number % 1.0")
    full = completed_program(p.extra["prompt"], "def truncate_number(x):\n    return x % 1.0",
                             p.extra["entry_point"])
    assert full.lstrip().startswith("def truncate_number")


def test_python_executor_shows_final_variables_when_nothing_was_printed():
    tool = python_executor(timeout_s=2)
    res = tool.run(ToolContext(None, "2", "```python\neggs = 16 - 3 - 4\ntotal = eggs * 2\n```", {}, 0))
    assert res.text == "The code printed nothing; its final variables: eggs = 9, total = 18"
    quiet = tool.run(ToolContext(None, "2", "```python\ndef f():\n    return 1\n```", {}, 0))
    assert quiet.text == "The code ran but printed nothing."
    # printing something suppresses the variable listing
    loud = tool.run(ToolContext(None, "2", "```python\nx = 3\nprint(x + 1)\n```", {}, 0))
    assert loud.text == "The code ran and printed:\n4"
