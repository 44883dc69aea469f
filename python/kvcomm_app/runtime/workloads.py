"""Workloads like the paper's: the roles of each task, how a question is shown, how the
final answer is extracted and scored.

- math (GSM8K, MATH500): solver / analyst / programming expert (its code runs in the
  sandbox and the output becomes a condition) / inspector, then a decision agent.
- mmlu: experts and a critic, then a decision agent that names a letter.
- humaneval: writers and a test analyst whose internal-test results are a condition,
  then a decision agent that writes the final function.
- squad (reading comprehension, the paper's retrieval-augmented setting): the first
  reader's retrieval tool puts the question's passage into every prompt as one shared
  slot; readers and a checker answer with a span, a decision agent gives the final span,
  scored by exact match (correct) and token F1.
Prompts are fixed text (no braces) and short: every token is prefill cost on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .agents import Role
from .answers import (best_em, best_f1, extract_choice, extract_code, extract_math, extract_number, extract_span,
                      normalize_math, normalize_span, numbers_equal)
from .datasets import Problem
from .tools import internal_tests, passage_retrieval, passes_hidden_tests, python_executor


@dataclass
class Workload:
    name: str
    tasks: tuple[str, ...]                  # dataset names it serves
    roles: list[Role]                       # one per worker agent, in node order
    decision_role: Role
    question_label: str
    format_question: Callable[[Problem], str]
    extract: Callable[[str, Problem], str | None]   # final answer (or code) from a reply
    score: Callable[[str | None, Problem], bool]    # is the extracted answer right
    choice: Callable[[str, Problem], str | None]    # the judge's choice, for consistency
    partial_score: Callable[[str | None, Problem], float] | None = None   # e.g. token F1


# ---- math -------------------------------------------------------------------------

_MATH_FORMAT = "End with: The answer is N."


def math_roles(code_timeout_s: float = 5.0) -> dict[str, Role]:
    return {
        "solver": Role(
            "solver", "Math Solver",
            "You are a math solver. Solve the problem step by step and give a number.",
            f"Solve the problem step by step. {_MATH_FORMAT}"),
        "analyst": Role(
            "analyst", "Mathematical Analyst",
            "You are a mathematical analyst. You break a problem into quantities and "
            "relations before computing.",
            f"List the known quantities, then compute the result. {_MATH_FORMAT}"),
        "programmer": Role(
            "programmer", "Programming Expert",
            "You are a programming expert. You solve math problems by writing a short "
            "Python program that prints the answer.",
            "Write a short Python program in a python code block that prints the answer.",
            tool=python_executor(code_timeout_s)),
        "inspector": Role(
            "inspector", "Inspector",
            "You are an inspector. You check other people's solutions for mistakes.",
            f"Check the replies above for mistakes and give the correct result. {_MATH_FORMAT}"),
    }


MATH_PRESETS = {1: ["solver"], 2: ["solver", "programmer"], 3: ["solver", "programmer", "inspector"],
                4: ["solver", "analyst", "programmer", "inspector"],
                5: ["solver", "analyst", "programmer", "inspector", "solver"]}


def _preset(presets: dict[int, list[str]], n: int) -> list[str]:
    if n in presets:
        return presets[n]
    largest = presets[max(presets)]
    return [largest[i % len(largest)] for i in range(n)]


def math_workload(n_agents: int = 4, task: str = "gsm8k", code_timeout_s: float = 5.0) -> Workload:
    roles = math_roles(code_timeout_s)
    decision = Role("decision", "Final Decision Maker",
                    "You are the final decision maker. You read the team's work and give "
                    "one final answer.",
                    f"Decide the final result. {_MATH_FORMAT}")
    if task == "math500":
        extract = lambda text, p: extract_math(text)  # noqa: E731
        score = lambda pred, p: pred is not None and (pred == p.gold or numbers_equal(pred, p.gold))  # noqa: E731
    else:
        extract = lambda text, p: extract_number(text)  # noqa: E731
        score = lambda pred, p: numbers_equal(pred, p.gold)  # noqa: E731
    return Workload("math", ("gsm8k", "math500"), [roles[r] for r in _preset(MATH_PRESETS, n_agents)],
                    decision, "Problem", lambda p: p.question, extract, score, extract)


# ---- multiple choice (MMLU) --------------------------------------------------------

_MC_FORMAT = "End with: The answer is (X), where X is A, B, C or D."


def mmlu_roles() -> dict[str, Role]:
    return {
        "expert": Role("expert", "Knowledge Expert",
                       "You are an expert with broad knowledge of science, history, law and medicine.",
                       f"Explain briefly which option is right. {_MC_FORMAT}"),
        "reasoner": Role("reasoner", "Reasoning Expert",
                         "You are an expert in careful reasoning. You eliminate wrong options one by one.",
                         f"Eliminate the wrong options, then choose. {_MC_FORMAT}"),
        "specialist": Role("specialist", "Subject Specialist",
                           "You are a specialist who recalls definitions and facts precisely.",
                           f"Recall the relevant facts, then choose. {_MC_FORMAT}"),
        "critic": Role("critic", "Critic",
                       "You are a critic. You look for errors in the experts' arguments.",
                       f"Point out any error in the replies above, then choose. {_MC_FORMAT}"),
    }


MMLU_PRESETS = {1: ["expert"], 2: ["expert", "critic"], 3: ["expert", "reasoner", "critic"],
                4: ["expert", "reasoner", "specialist", "critic"],
                5: ["expert", "reasoner", "specialist", "expert", "critic"]}


def format_mc(p: Problem) -> str:
    options = "\n".join(f"({'ABCDEFGHIJ'[k]}) {c}" for k, c in enumerate(p.extra["choices"]))
    return f"{p.question}\n{options}"


def mmlu_workload(n_agents: int = 3) -> Workload:
    roles = mmlu_roles()
    decision = Role("decision", "Final Decision Maker",
                    "You are the final decision maker. You weigh the experts and the critic and "
                    "choose one option.", f"Choose the final option. {_MC_FORMAT}")
    pick = lambda text, p: extract_choice(text, len(p.extra["choices"]))  # noqa: E731
    return Workload("mmlu", ("mmlu",), [roles[r] for r in _preset(MMLU_PRESETS, n_agents)], decision,
                    "Question", format_mc, pick, lambda pred, p: pred is not None and pred == p.gold, pick)


# ---- code (HumanEval) --------------------------------------------------------------

_CODE_FORMAT = "Write the complete function in one python code block."

CODE_PRESETS = {1: ["writer"], 2: ["writer", "analyst"], 3: ["writer", "designer", "analyst"],
                4: ["writer", "designer", "writer", "analyst"],
                5: ["writer", "designer", "writer", "designer", "analyst"]}


def code_workload(n_agents: int = 3, test_timeout_s: float = 5.0) -> Workload:
    names = _preset(CODE_PRESETS, n_agents)
    base = {
        "writer": Role("writer", "Python Programmer",
                       "You are a Python programmer. You write correct, simple code.",
                       f"Implement the function. {_CODE_FORMAT}"),
        "designer": Role("designer", "Algorithm Designer",
                         "You are an algorithm designer. You think about edge cases first.",
                         f"Name the edge cases, then implement the function. {_CODE_FORMAT}"),
    }
    titles = {}
    roles = []
    for i, n in enumerate(names):
        if n == "analyst":
            roles.append(Role("analyst", "Test Analyst",
                              "You are a test analyst. You read test results and explain what is "
                              "wrong with the code.",
                              "Say which implementation passes the examples and fix any failure. "
                              f"{_CODE_FORMAT}",
                              tool=internal_tests(titles, test_timeout_s)))
        else:
            roles.append(base[n])
            titles[str(i)] = base[n].title
    decision = Role("decision", "Final Decision Maker",
                    "You are the final decision maker. You read the code and test results and "
                    "give the final implementation.", f"Give the final implementation. {_CODE_FORMAT}")
    extract = lambda text, p: extract_code(text, p.extra["entry_point"])  # noqa: E731

    def choice(text: str, p: Problem) -> str | None:
        code = extract(text, p)
        return None if code is None else "\n".join(ln.rstrip() for ln in code.strip().splitlines())

    # The prompt's edge newlines would merge with the template's own newlines around
    # {user_question} into one token across the slot edge, which forces every call dense
    # (measured: all 164 prompts raw, none stripped).
    return Workload("code", ("humaneval",), roles, decision, "Task",
                    lambda p: p.extra["prompt"].strip("\n"), extract,
                    lambda code, p: passes_hidden_tests(p, code), choice)


# ---- reading comprehension (SQuAD) --------------------------------------------------

_SPAN_FORMAT = "Reply with the answer only: a few words copied from the passage."

SQUAD_PRESETS = {1: ["reader"], 2: ["reader", "checker"], 3: ["reader", "reader", "checker"],
                 4: ["reader", "reader", "reader", "checker"],
                 5: ["reader", "reader", "reader", "checker", "checker"]}


def squad_workload(n_agents: int = 3) -> Workload:
    names = _preset(SQUAD_PRESETS, n_agents)
    reader = lambda tool: Role(  # noqa: E731
        "reader", "Reader", "You answer questions about a passage with a short span copied from it.",
        f"Answer the question from the passage. {_SPAN_FORMAT}", tool=tool)
    checker = Role("checker", "Checker",
                   "You check answers to questions about a passage against the passage.",
                   f"Check the answers above against the passage and give the correct one. {_SPAN_FORMAT}")
    # Only the first reader retrieves: its tool result is the one passage every agent reads.
    roles = [reader(passage_retrieval()) if i == 0 else (reader(None) if n == "reader" else checker)
             for i, n in enumerate(names)]
    decision = Role("decision", "Final Decision Maker",
                    "You give the final answer to a question about a passage.",
                    f"Give the final answer. {_SPAN_FORMAT}")
    extract = lambda text, p: extract_span(text)  # noqa: E731
    choice = lambda text, p: (lambda s: None if s is None else normalize_span(s))(extract_span(text))  # noqa: E731
    return Workload("squad", ("squad",), roles, decision, "Question", lambda p: p.question, extract,
                    lambda pred, p: best_em(pred, p.extra["answers"]), choice,
                    partial_score=lambda pred, p: best_f1(pred, p.extra["answers"]))


def make_workload(task: str, n_agents: int) -> Workload:
    if task in ("gsm8k", "math500"):
        return math_workload(n_agents, task)
    if task == "mmlu":
        return mmlu_workload(n_agents)
    if task == "humaneval":
        return code_workload(n_agents)
    if task == "squad":
        return squad_workload(n_agents)
    raise ValueError(f"no workload for task {task!r}; known: gsm8k, math500, mmlu, humaneval, squad")


__all__ = ["Workload", "math_workload", "mmlu_workload", "code_workload", "squad_workload", "make_workload",
           "normalize_math"]
