"""Answer extraction and comparison per task."""
import pytest

from kvcomm_app.runtime.answers import (extract_choice, extract_code, extract_math, extract_number,
                                    last_boxed, normalize_math, numbers_equal)


@pytest.mark.parametrize("text,want", [
    ("She makes 9 * 2 = 18 dollars. The answer is 18.", "18"),
    ("#### 1,234", "1234"),
    ("So the answer is $5.50 per cup", "5.5"),
    ("The answer is: **42**", "42"),
    ("First 3 then 4 and finally 12", "12"),
    ("result \\boxed{7}", "7"),
    ("Answer: -3", "-3"),
    ("The answer is 18 eggs, not 20 or 21.", "18"),
    ("no digits here", None),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_numbers_equal():
    assert numbers_equal("18", "18.0") and numbers_equal("1,000", "1000")
    assert numbers_equal("0.5", "1/2")
    assert not numbers_equal("18", "19") and not numbers_equal(None, "1")
    assert not numbers_equal("x", "1")


@pytest.mark.parametrize("text,want", [
    ("The answer is (B).", "B"),
    ("Answer: C", "C"),
    ("I think (A) is wrong, so (D) it is", "D"),
    ("B. Because of the tides", "B"),
    ("  C  ", "C"),
    ("A person would say so", None),
    ("The answer is (E)", None),
])
def test_extract_choice(text, want):
    assert extract_choice(text) == want


def test_math_answers():
    assert last_boxed("so \\boxed{\\frac{1}{2}} and \\boxed{(3, \\frac{\\pi}{2})}.") == "(3, \\frac{\\pi}{2})"
    assert last_boxed("\\boxed{unclosed") is None
    assert normalize_math("\\left( 3, \\dfrac{\\pi}{2} \\right)") == "(3,\\frac{\\pi}{2})"
    assert normalize_math("\\text{Evelyn}") == "Evelyn"
    assert normalize_math("90^\\circ") == "90" and normalize_math("\\frac{14}{3}") == "14/3"
    assert extract_math("thus \\boxed{\\dfrac14}") == normalize_math("0.25") == "0.25"
    assert extract_math("The answer is $p - q$.") == "p-q"
    assert extract_math("nothing") is None


def test_extract_code():
    text = ("Idea first.\n```python\ndef helper():\n    pass\n```\nThen:\n"
            "```python\ndef add(a, b):\n    return a + b\n```\nDone.")
    assert extract_code(text, "add").startswith("def add(a, b)")
    assert extract_code(text).startswith("def add")            # last block without an entry point
    assert extract_code("def add(a, b):\n    return a+b", "add").startswith("def add")
    assert extract_code("```python\nx = 1\n", None) == "x = 1\n"   # unterminated block at the end
    assert extract_code("just words") is None
