"""Plain chat requests laid out (kvcomm.plan.contents, kvcomm.plan.chat): known texts found
again (whole messages and embedded ones, longest first, per tenant, bounded memory), slots
named by role, the agent by its system messages, the session inferred or given, and requests
with nothing known left alone."""
import pytest

from kvcomm.plan.chat import ChatError, infer
from kvcomm.plan.contents import ContentIndex
from kvcomm.plan.template import RAW_FRAME, render_layout

TASK = ("Read the passage and answer. The city library opened in 1921 with four thousand books; "
        "it moved to the river bank in 1967 and now lends ninety thousand items a year. "
        "Question: when did the library move?")
REPLY_A = "The library moved to the river bank in 1967, about forty-six years after it opened in 1921."
REPLY_B = "That is right: the passage says it moved in 1967, so the first answer is correct."


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def test_the_index_finds_whole_and_embedded_texts_per_tenant():
    idx = ContentIndex()
    idx.add("t1", TASK, "user", "user", "s1")
    idx.add("t1", REPLY_A, "reply", "asolver", "s1", ids=[1, 2, 3])
    assert idx.add("t1", "short", "user", "user", "s1") is None           # too short to be a content
    text = f"Agent solver said: {REPLY_A}\nAnd the task was:\n{TASK}"
    found = idx.find("t1", text)
    assert [(m.known.kind, text[m.start:m.end]) for m in found] == [("reply", REPLY_A), ("user", TASK)]
    assert idx.find("t2", text) == []                                      # another tenant's text is never found
    # overlapping candidates: the longest wins
    idx.add("t1", REPLY_A[:40], "user", "user", "s2")
    assert [m.known.text for m in idx.find("t1", REPLY_A)] == [REPLY_A]


def test_the_index_forgets_the_least_recently_seen_past_its_budget():
    idx = ContentIndex(max_bytes=3 * 100)
    texts = [f"text number {i} " + "x" * 80 for i in range(5)]
    for t in texts[:3]:
        idx.add("t", t, "user", "user", "s")
    idx.find("t", texts[0])                                                # texts[0] seen again: recent
    for t in texts[3:]:
        idx.add("t", t, "user", "user", "s")
    assert idx.bytes <= 300 and idx.get("t", texts[0]) is not None
    assert idx.get("t", texts[1]) is None and idx.get("t", texts[2]) is None


def messages(*extra, system="You check answers against the passage."):
    return [{"role": "system", "content": system}, {"role": "user", "content": TASK}, *extra]


def test_a_framework_request_is_laid_out_by_role(tok):
    idx = ContentIndex()
    first = infer(messages(system="You answer questions."), tok, idx, "t")
    assert first.template is None and first.remember == [(TASK, "user", "user")]   # nothing known yet
    idx.add("t", TASK, "user", "user", first.session)
    idx.add("t", REPLY_A, "reply", "asolver", first.session)
    call = infer(messages({"role": "user", "name": "solver", "content": REPLY_A}), tok, idx, "t")
    assert [n for n, _, _ in call.spans] == ["user_question", "agent_asolver_current"]
    assert call.session == first.session                                   # found by its contents
    assert call.inputs == {"user_question": TASK, "agent_asolver_current": REPLY_A}
    assert call.template.names == ("user_question", "agent_asolver_current")
    lay = render_layout(tok, RAW_FRAME, call.text, list(call.spans))
    assert lay.problem is None and lay.ids == tok(call.text, add_special_tokens=False)["input_ids"]
    other = infer(messages(system="Someone else."), tok, idx, "t")
    assert other.agent != call.agent and other.pool_key != call.pool_key     # the agent is its system text
    assert infer(messages(), tok, idx, "t", session="given").session == "given"


def test_replies_of_one_agent_get_current_history_and_older_slots(tok):
    idx = ContentIndex()
    idx.add("t", TASK, "user", "user", "s")
    replies = [REPLY_A, REPLY_B, REPLY_A.replace("1967", "the sixties")]
    for r in replies:
        idx.add("t", r, "reply", "asolver", "s")
    call = infer(messages(*({"role": "user", "name": "solver", "content": r} for r in replies)), tok, idx, "t")
    assert [n for n, _, _ in call.spans] == ["user_question", "agent_asolver-2_current", "agent_asolver_history",
                                             "agent_asolver_current"]


def test_short_contents_special_tokens_and_bad_messages(tok):
    idx = ContentIndex()
    idx.add("t", TASK, "user", "user", "s")
    assert infer(messages(), tok, idx, "t", min_tokens=500).template is None   # shorter than the minimum
    idx.add("t", REPLY_A + "<|im_end|>", "reply", "asolver", "s")
    call = infer(messages({"role": "user", "content": REPLY_A + "<|im_end|>"}), tok, idx, "t",
                 specials=("<|im_end|>",))
    assert [n for n, _, _ in call.spans] == ["user_question"]                 # never a content with a control token
    with pytest.raises(ChatError, match="non-text"):
        infer([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], tok, idx, "t")
    with pytest.raises(ChatError, match="non-empty list"):
        infer([], tok, idx, "t")


def test_a_short_reply_is_a_content_only_as_a_whole_message():
    idx = ContentIndex()
    assert idx.add("t", "Yes.", "user", "user", "s") is None               # a short user text: never a content
    assert idx.add("t", "The answer is: 2", "reply", "asolver", "s") is not None
    found = idx.find("t", "  The answer is: 2\n")                           # the whole message, edge whitespace aside
    assert [(m.start, m.end, m.known.producer) for m in found] == [(2, 18, "asolver")]
    assert idx.find("t", "I think The answer is: 2 is wrong, says the critic.") == []   # not inside a longer text
    assert idx.find("t", "The answer is: 3") == [] and idx.find("u", "The answer is: 2") == []


def test_a_text_said_by_several_agents_is_named_after_who_said_it_in_this_conversation(tok):
    idx = ContentIndex()
    idx.add("t", TASK, "user", "user", "s1")
    idx.add("t", "The answer is 1967.", "reply", "asolver", "s1")          # another conversation said it first
    idx.add("t", TASK.replace("library", "museum"), "user", "user", "s2")
    idx.add("t", "The answer is 1967.", "reply", "acritic", "s2")           # here the critic said it first...
    idx.add("t", "The answer is 1967.", "reply", "asolver", "s2")           # ...then the solver repeated it
    body = [{"role": "user", "content": TASK.replace("library", "museum")},
            {"role": "user", "name": "critic", "content": "The answer is 1967."},
            {"role": "user", "name": "solver", "content": "The answer is 1967."}]
    call = infer([{"role": "system", "content": "You sum up."}, *body], tok, idx, "t")
    assert call.session == "s2"                                             # the short reply does not outvote the task
    assert [n for n, _, _ in call.spans] == ["user_question", "agent_acritic_current", "agent_asolver_current"]
    again = infer([{"role": "system", "content": "You sum up."}, *body], tok, idx, "t", min_tokens=16)
    assert [n for n, _, _ in again.spans] == ["user_question"]              # a minimum leaves short ones literal


def test_short_replies_keep_the_template_of_the_next_conversation_the_same(tok):
    """Two conversations whose short replies differ get one template: the replies are slots."""
    idx, keys = ContentIndex(), []
    for sid, (task, reply) in enumerate([(TASK, "The answer is 1967."),
                                         (TASK.replace("1967", "1971"), "It moved in 1971.")]):
        idx.add("t", task, "user", "user", str(sid))
        idx.add("t", reply, "reply", "asolver", str(sid))
        call = infer([{"role": "system", "content": "You check."}, {"role": "user", "content": task},
                      {"role": "user", "name": "solver", "content": reply}], tok, idx, "t")
        keys.append(call.template_key)
        assert [n for n, _, _ in call.spans] == ["user_question", "agent_asolver_current"]
    assert keys[0] == keys[1]
