"""Templates: parsing, errors that name the problem, spans from character offsets."""
from __future__ import annotations

import pytest

from kvcomm.plan.template import (CONDITION, CURRENT, HISTORY, QUESTION, TemplateError, chat_frame, classify,
                                    fill, parse_template, render_layout)
from kvcomm.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_parse_kinds_and_literals():
    t = parse_template("Q:\n{user_question}\n{{not a slot}}\n{agent_solver_1_current} {agent_b_history}"
                       "\n{condition_tool-x_current}")
    assert t.names == ("user_question", "agent_solver_1_current", "agent_b_history", "condition_tool-x_current")
    kinds = [(p.kind, p.owner) for p in t.placeholders]
    assert kinds == [(QUESTION, None), (CURRENT, "solver_1"), (HISTORY, "b"), (CONDITION, "tool-x")]
    literal = "".join(p for p in t.pieces if isinstance(p, str))
    assert "{not a slot}" in literal and "{{" not in literal


@pytest.mark.parametrize("text,needle", [
    ("Q: {user_question", "unbalanced '{' at position 3"),
    ("Q: {user_question", "(no closing '}'; write '{{' for a literal brace)"),
    ("Q: user_question}", "(write '}}' for a literal brace)"),
    ("Q: user_question}", "unbalanced '}' at position 16"),
    ("Q: {{user_question}", "unbalanced '}'"),
    ("a {b {user_question}}", "unbalanced '{' at position 2"),
    ("Q: {}", "empty placeholder name"),
    ("Q: {  }", "empty placeholder name"),
    ("Q: {question}", "unknown placeholder {question} at position 3"),
    ("{agent__current}", "unknown placeholder {agent__current}"),
    ("{agent_x_future}", "unknown placeholder {agent_x_future}"),
    ("{condition_x_history}", "unknown placeholder {condition_x_history}"),
    ("{user question}", "bad placeholder name {user question}"),
    ("{user_question} and {user_question}", "appears twice"),
])
def test_malformed_templates_are_rejected_with_position(text, needle):
    with pytest.raises(TemplateError) as e:
        parse_template(text)
    assert needle in str(e.value)


def test_classify_is_strict():
    assert classify("agent_a_current").owner == "a"
    with pytest.raises(TemplateError, match="unknown placeholder"):
        classify("agent_current")


def test_fill_errors_name_the_input():
    t = parse_template("A\n{user_question}\nB\n{agent_x_current}")
    with pytest.raises(TemplateError, match=r"no input for placeholder\(s\) \{agent_x_current\}"):
        fill(t, {"user_question": "q"}, "judge")
    with pytest.raises(TemplateError, match="input\\(s\\) extra match no placeholder"):
        fill(t, {"user_question": "q", "agent_x_current": "r", "extra": "e"})
    with pytest.raises(TemplateError, match=r"input \{agent_x_current\} is empty"):
        fill(t, {"user_question": "q", "agent_x_current": "  \n"})
    text, spans = fill(t, {"user_question": "qq", "agent_x_current": "rrr"})
    assert text == "A\nqq\nB\nrrr"
    assert [(n, text[a:b]) for n, a, b in spans] == [("user_question", "qq"), ("agent_x_current", "rrr")]


def test_spans_come_from_one_tokenization(tok):
    frame = chat_frame(tok, "You are terse.")
    t = parse_template("Question:\n{user_question}\n\nReply:\n{agent_a_current}\n\nAnswer.")
    inputs = {"user_question": "What is 2+2?", "agent_a_current": "It is 4."}
    text, spans = fill(t, inputs)
    lay = render_layout(tok, frame, text, spans)
    assert lay.problem is None
    full = tok(frame.prefix + text + frame.suffix, add_special_tokens=frame.add_special_tokens).input_ids
    assert lay.ids == full
    for i, (name, a, b) in enumerate(lay.spans):
        assert tok.decode(lay.ids[a:b]) == inputs[name]
    # S0, slots and segments tile the prompt up to its last token.
    edges = [(0, lay.s0)] + [(a, b) for _, a, b in lay.spans] + lay.segments
    covered = sorted(edges)
    assert covered[0][0] == 0 and covered[-1][1] == lay.length - 1
    assert all(covered[i][1] == covered[i + 1][0] for i in range(len(covered) - 1))
    assert tok.decode(lay.ids[lay.segments[0][0]:lay.segments[0][1]]) == "\n\nReply:\n"


def test_boundary_merge_is_detected(tok):
    # The tiny tokenizer merges a space with the following letter (like real BPE):
    # "Q: What" puts " W" in one token that straddles the slot's start.
    frame = chat_frame(tok, None)
    t = parse_template("Q: {user_question}\nA:")
    text, spans = fill(t, {"user_question": "What is it?"})
    lay = render_layout(tok, frame, text, spans)
    assert lay.problem is not None and "boundary token merge at slot user_question" in lay.problem
    text, spans = fill(t, {"user_question": "2 + 2?"})  # starts with a digit: clean edge
    assert render_layout(tok, frame, text, spans).problem is None


def test_chat_frame_puts_user_text_verbatim(tok):
    frame = chat_frame(tok, "SYS")
    rendered = tok.apply_chat_template([{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}],
                                       tokenize=False, add_generation_prompt=True)
    assert frame.prefix + "hi" + frame.suffix == rendered
    assert frame.suffix.endswith("assistant\n")
