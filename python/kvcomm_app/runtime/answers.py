"""Pulling a final answer out of free text, per kind of task, and comparing answers.

Small models answer in many shapes ("The answer is 18.", "#### 18", "\\boxed{18}",
"(B)", "Answer: B"). Each extractor tries the explicit forms first and falls back
to the last thing of the right kind; it returns None when nothing fits, which
scores as wrong (never guessed).
"""
from __future__ import annotations

import re
import string
from fractions import Fraction

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def parse_number(s: str) -> Fraction | None:
    """'1,234' -> 1234, '$5.50' -> 11/2, '3/4' -> 3/4, '\\frac{3}{4}' -> 3/4; else None."""
    s = s.strip().rstrip(".").replace("$", "").replace(",", "").replace("\\!", "")
    s = s.replace("\\%", "").rstrip("%").strip()
    m = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def extract_number(text: str) -> str | None:
    """Final numeric answer of a GSM8K-style reply, as a canonical string ('18', '2.5')."""
    for pattern in (r"####\s*(" + _NUMBER + ")",
                    r"answer is[:\s]*\**\s*(" + _NUMBER + ")",
                    r"[Aa]nswer[:\s]*\**\s*(" + _NUMBER + ")"):
        hits = re.findall(pattern, text)
        if hits:
            return _canonical_number(hits[-1])
    boxed = last_boxed(text)
    if boxed is not None and parse_number(boxed) is not None:
        return _canonical_number(boxed)
    hits = re.findall(_NUMBER, text)
    return _canonical_number(hits[-1]) if hits else None


def _canonical_number(s: str) -> str | None:
    value = parse_number(s)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    return str(float(value)) if len(str(float(value))) < 12 else f"{value.numerator}/{value.denominator}"


def numbers_equal(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    return a is not None and b is not None and a == b


_LETTERS = "ABCDEFGHIJ"


def extract_choice(text: str, n_choices: int = 4) -> str | None:
    """The letter of a multiple-choice reply ('answer is (B)', 'Answer: B', '(C)',
    'C. ...' at a line start, or a reply that is just the letter). A bare capital
    inside a sentence is not taken: 'A' is also an English word."""
    cls = f"[{_LETTERS[:n_choices]}]"
    for pattern in (rf"answer is[:\s]*\**\(?({cls})\)?(?![A-Za-z])",
                    rf"[Aa]nswer[:\s]*\**\(?({cls})\)?(?![A-Za-z])",
                    rf"\(({cls})\)",
                    rf"(?m)^\s*\**({cls})[.):](?:\s|$)"):
        hits = re.findall(pattern, text)
        if hits:
            return hits[-1]
    m = re.fullmatch(rf"\s*\**({cls})\**\s*\.?\s*", text)
    return m.group(1) if m else None


def normalize_math(answer: str | None) -> str | None:
    """Canonical form of a MATH answer for string comparison (spacing, \\left/\\right,
    \\dfrac, \\text{}, $...$, degrees and a trailing period do not matter)."""
    if answer is None:
        return None
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                 ("\\!", ""), ("\\,", ""), ("\\;", ""), ("^\\circ", ""), ("^{\\circ}", ""),
                 ("\\%", ""), ("\\$", ""), (" ", "")):
        s = s.replace(a, b)
    s = s.rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    if s.startswith("x=") or s.startswith("y="):
        s = s[2:]
    value = parse_number(s)
    if value is not None:
        return _canonical_number(s)
    return s


def extract_math(text: str) -> str | None:
    """Final answer of a MATH-style reply: last \\boxed{}, else 'answer is X', else last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize_math(boxed)
    m = re.findall(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s|\.$|$|\n)", text)
    if m:
        return normalize_math(m[-1])
    hits = re.findall(_NUMBER, text)
    return normalize_math(hits[-1]) if hits else None


def extract_code(text: str, entry_point: str | None = None) -> str | None:
    """Python code of a reply: the fenced block that defines `entry_point` (else the
    last fenced block); unfenced text that starts with def/import/from as a fallback."""
    blocks = re.findall(r"```(?:[Pp]ython|py)?[ \t]*\n(.*?)(?:```|\Z)", text, flags=re.S)
    blocks = [b for b in blocks if b.strip()]
    if blocks:
        if entry_point:
            for b in reversed(blocks):
                if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b):
                    return b
        return blocks[-1]
    m = re.search(r"^(?:def |import |from |class )", text, flags=re.M)
    return text[m.start():] if m else None


# ---- extractive QA (SQuAD): the official evaluation's normalisation, EM and F1 ------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_span(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def span_f1(pred: str | None, gold: str) -> float:
    """Token-overlap F1 of a predicted span against one reference (normalised)."""
    p, g = normalize_span(pred or "").split(), normalize_span(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum(min(p.count(t), g.count(t)) for t in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def best_em(pred: str | None, golds: list[str]) -> bool:
    return pred is not None and any(normalize_span(pred) == normalize_span(g) for g in golds)


def best_f1(pred: str | None, golds: list[str]) -> float:
    return max((span_f1(pred, g) for g in golds), default=0.0)


def extract_span(text: str) -> str | None:
    """The answer span of a reply: after a last 'Answer:' if there is one, else the first
    line; cut at the first sentence end, stripped of quotes and a trailing period."""
    if not text or not text.strip():
        return None
    tail = re.split(r"(?i)\banswer\s*(?:is)?\s*:\s*", text)[-1] if re.search(r"(?i)\banswer\s*(?:is)?\s*:", text) else text
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
    line = re.split(r"(?<=[^A-Z0-9])[.!?](\s|$)", line, maxsplit=1)[0]
    span = line.strip().strip("\"'*`").rstrip(".").strip()
    return span or None
