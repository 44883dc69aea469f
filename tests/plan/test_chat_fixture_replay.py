"""The layout inference on real framework traffic: the recorded AutoGen and LangGraph calls
(tests/fixtures/chat/) replayed in arrival order through kvcomm.plan.chat.infer, each call's
texts and the server's reply remembered afterwards as the server does
(kvcomm.vllm.chat_front.ChatFront.remember). What the server can reuse is bounded by what this
finds; tests/vllm/test_vllm_chat.py runs the server itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcomm.plan.chat import infer, message_text
from kvcomm.plan.contents import ContentIndex

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "chat"
WARM_UP = 2   # conversations before the measured ones (the pools learn; the index is warm)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def replay(tok, framework: str, **infer_kwargs):
    """[(record, ChatCall, tokens after the agent's own prefix, tokens inside contents)]."""
    with open(FIX / f"{framework}.jsonl", encoding="utf-8") as f:
        records = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["t_request"])
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])   # noqa: E731
    index, out = ContentIndex(), []
    for r in records:
        req = r["request"]
        call = infer(req["messages"], tok, index, "tenant", tools=req.get("tools"), **infer_kwargs)
        # the agent's own prefix: everything before its first message that is not a system message
        first = next(message_text(m) for m in req["messages"] if m["role"] not in ("system", "developer"))
        s0 = call.text.find(first)
        after = count(call.text) - count(call.text[:s0])
        out.append((r, call, after, sum(count(call.text[a:b]) for _, a, b in call.spans)))
        for text, kind, role in call.remember:
            index.add("tenant", text, kind, role, call.session)
        reply = (r["response"].get("text") or "").strip()
        if reply:
            index.add("tenant", reply, "reply", call.agent, call.session)
    return out


@pytest.fixture(scope="module", params=["autogen", "langgraph"])
def replayed(request, tok):
    return request.param, replay(tok, request.param)


def test_each_conversation_is_one_inferred_session(replayed):
    _, calls = replayed
    by_conversation: dict[int, set] = {}
    for r, call, _, _ in calls:
        if call.spans:
            by_conversation.setdefault(r["conversation"], set()).add(call.session)
    assert all(len(s) == 1 for s in by_conversation.values()), by_conversation
    assert len(by_conversation) == len({r["conversation"] for r, *_ in calls})
    # Conversations on different tasks are different sessions; one that repeats an earlier
    # conversation's task text word for word (AutoGen's selector runs on tasks 0 and 3) joins
    # that conversation's session: its shared text is the same text, with the same base.
    task_of = {r["conversation"]: r["task"] for r, *_ in calls}
    session_of = {conv: next(iter(s)) for conv, s in by_conversation.items()}
    for a in session_of:
        for b in session_of:
            if a < b and task_of[a] != task_of[b]:
                assert session_of[a] != session_of[b], f"conversations {a} and {b} were taken for one"


def test_agents_are_their_system_messages(replayed):
    framework, calls = replayed
    agents = {call.agent for r, call, _, _ in calls if r["request"]["messages"][0]["role"] == "system"}
    # three agents; the solver's calls that carry the tool schema are an agent of their own
    assert len(agents) == 4 if framework == "langgraph" or any(r["request"].get("tools") for r, *_ in calls) else 3


def test_every_later_call_finds_the_task_and_the_replies(replayed):
    _, calls = replayed
    firsts = set()
    for r, call, after, inside in calls:
        conv = r["conversation"]
        if conv not in firsts:
            firsts.add(conv)
            continue   # the task's first carrier: nothing is known yet
        names = [name for name, _, _ in call.spans]
        assert "user_question" in names, (conv, r["call"])
        replies = [m for m in call.matches if m.kind == "reply"]
        earlier = [m for m in r["request"]["messages"][1:]
                   if m["role"] == "assistant" and (m.get("content") or "").strip()]
        if earlier:
            assert replies, (conv, r["call"], "no reply found")


def _met_before(calls) -> float:
    """Share of the later calls with a layout whose template an earlier call had already."""
    seen, later = set(), []
    for r, call, _, _ in calls:
        if call.template is None:
            continue
        if r["conversation"] >= WARM_UP:
            later.append(call.template_key in seen)
        seen.add(call.template_key)
    return sum(later) / len(later)


def test_templates_recur_because_short_replies_are_slots(replayed, tok):
    """A template met for the first time has no exact prefix and segment KV yet (the server
    serves that call plainly): short replies left in the prompt as literal text make every
    conversation's template a new one."""
    framework, calls = replayed
    now, literal = _met_before(calls), _met_before(replay(tok, framework, min_tokens=16))
    assert now >= 0.4 and now >= 2 * literal, f"{framework}: {now:.2f} of templates met before ({literal:.2f} literal)"


def test_contents_cover_most_tokens_after_each_agents_prefix(replayed):
    """The bound on what the server can reuse: after the warm-up, the tokens of every call but a
    conversation's first (whose task nobody has seen yet) that lie in inferred contents."""
    framework, calls = replayed
    later = [(after, inside) for r, call, after, inside in calls
             if r["conversation"] >= WARM_UP and r["call"] > 0]
    share = sum(i for _, i in later) / sum(a for a, _ in later)
    assert share >= 0.85, f"{framework}: {share:.3f} of the tokens after the agents' prefixes are contents"


def test_a_tool_result_seen_in_one_conversation_is_a_content_in_the_next(replayed):
    _, calls = replayed
    tool_calls = [(r, call) for r, call, _, _ in calls
                  if any(m["role"] == "tool" for m in r["request"]["messages"])]
    assert tool_calls, "the fixtures hold no tool result"
    later = [call for r, call in tool_calls if r["conversation"] == max(rr["conversation"] for rr, _ in tool_calls)]
    assert any(name.startswith("condition_tool") for call in later for name, _, _ in call.spans)


def test_replies_with_edge_whitespace_are_found(replayed):
    _, calls = replayed
    edged = {(r["response"].get("text") or "") for r, *_ in calls}
    edged = {t.strip() for t in edged if t and t != t.strip() and len(t.strip()) >= 40}
    found = {m.text for _, call, _, _ in calls for m in call.matches if m.kind == "reply"}
    assert edged, "no reply with leading or trailing whitespace in the fixture"
    carried = {t for t in edged if any(t in message_text(m) for r, *_ in calls for m in r["request"]["messages"][1:])}
    assert carried and carried <= found, carried - found
