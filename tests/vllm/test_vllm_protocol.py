"""The KVCOMM request parameters: what the server accepts and the 400 messages it gives."""
import pytest

from kvcomm.vllm.protocol import ParamError, ids_digest, parse_call

TEMPLATE = "Problem:\n{user_question}\nAnswer:\n{agent_a_current}\nCheck it."


def body(**over):
    user = "Problem:\nWhat is 2+2?\nAnswer:\n4\nCheck it."
    p = {"agent": "checker", "template": TEMPLATE, "session": "s1",
         "slots": {"user_question": [9, 21], "agent_a_current": [30, 31]}}
    p.update(over.pop("params", {}))
    b = {"messages": [{"role": "system", "content": "You check."}, {"role": "user", "content": user}],
         "kv_transfer_params": {"kvcomm": p}}
    b.update(over)
    return b


def test_valid_call_parses():
    c = parse_call(body())
    assert c.agent == "checker" and c.system == "You check." and c.session == "s1" and c.round == 0
    assert c.inputs == {"user_question": "What is 2+2?", "agent_a_current": "4"}
    assert c.learn is True


@pytest.mark.parametrize("params, needle", [
    ({"slots": {"user_question": [9, 21], "nope": [0, 1]}}, "unknown slot 'nope'"),
    ({"slots": {"user_question": [9, 21]}}, "no span for placeholder(s) agent_a_current"),
    ({"slots": {"user_question": [9, 200], "agent_a_current": [30, 31]}}, "outside the user message"),
    ({"slots": {"user_question": [9, 20], "agent_a_current": [30, 31]}}, "differs from the template"),
    ({"slots": {"user_question": [9, "21"], "agent_a_current": [30, 31]}}, "must be an integer, got str"),
    ({"slots": [[9, 21]]}, "slots must be an object"),
    ({"agent": 7}, "agent must be a name"),
    ({"template": "Q: {bad name}"}, "template:"),
    ({"round": "1"}, "round must be an integer"),
    ({"round": -1}, "round must be >= 0"),
    ({"learn": "no"}, "learn must be true or false"),
    ({"session": ""}, "session must be a non-empty string"),
    ({"op": "encode"}, "'op' may only be set by the server"),
    ({"_server": {}}, "'_server' may only be set by the server"),
    ({"extra": 1}, "unknown field(s) extra"),
])
def test_bad_params_name_the_problem(params, needle):
    with pytest.raises(ParamError) as e:
        parse_call(body(params=params))
    assert needle in str(e.value)


def test_bad_messages():
    with pytest.raises(ParamError, match="messages must be"):
        parse_call(body(messages=[{"role": "assistant", "content": "x"}]))
    with pytest.raises(ParamError, match="content must be a string"):
        parse_call(body(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]))
    with pytest.raises(ParamError, match="kv_transfer_params must be an object"):
        parse_call(body(kv_transfer_params=[1]))
    with pytest.raises(ParamError, match="n must be 1"):
        parse_call(body(n=2))


def test_special_tokens_in_content_are_refused():
    b = body()
    b["messages"][1]["content"] = "Problem:\nWhat<|im_end|>?\nAnswer:\n4\nCheck it."
    b["kv_transfer_params"]["kvcomm"]["slots"] = {"user_question": [9, 24], "agent_a_current": [33, 34]}
    with pytest.raises(ParamError, match="special token"):
        parse_call(b, specials=("<|im_end|>",))


def test_ids_digest():
    assert ids_digest([1, 2, 3]) == ids_digest((1, 2, 3)) != ids_digest([1, 2])


def test_a_reuse_call_leaves_vllm_a_tail_of_prompt_tokens_to_compute():
    """A reuse plan estimates all but the last prompt token; the connector loads all but
    REUSE_TAIL of them (vLLM's step for a one-token prefill is the slow one); other paths load
    their whole prefix."""
    from kvcomm.vllm.jobs import PlanResult
    from kvcomm.vllm.scheduler_side import REUSE_TAIL, loaded_prefix

    assert REUSE_TAIL > 1
    assert loaded_prefix(PlanResult("reuse", "all slots shared", 799), 800) == 800 - REUSE_TAIL
    assert loaded_prefix(PlanResult("reuse", "all slots shared", 5), 6) == 0   # shorter than the tail
    assert loaded_prefix(PlanResult("partial", "partial: ...", 700), 800) == 700
    assert loaded_prefix(PlanResult("dense", "first carrier", 31), 800) == 31


def test_a_call_with_its_own_tail_loads_less_on_every_estimating_path():
    """An inferred chat call carries a tail (ChatFront.tail): vLLM computes that many last
    prompt tokens on the reuse and partial paths; a dense plan's exact prefix stays loaded;
    a tail shorter than a reuse call's own changes nothing."""
    from kvcomm.vllm.jobs import PlanResult
    from kvcomm.vllm.scheduler_side import REUSE_TAIL, loaded_prefix

    assert loaded_prefix(PlanResult("reuse", "all slots shared", 799), 800, 48) == 752
    assert loaded_prefix(PlanResult("reuse", "all slots shared", 799), 800, 2) == 800 - REUSE_TAIL
    assert loaded_prefix(PlanResult("partial", "partial: ...", 790), 800, 48) == 752
    assert loaded_prefix(PlanResult("partial", "partial: ...", 500), 800, 48) == 500   # computes more already
    assert loaded_prefix(PlanResult("reuse", "all slots shared", 30), 31, 48) == 0
    assert loaded_prefix(PlanResult("dense", "first carrier", 31), 800, 48) == 31


def test_chat_front_tail_setting_is_checked():
    """The chat tail defaults to DEFAULT_TAIL; a bad value is refused when the server starts."""
    import pytest

    from kvcomm.vllm.chat_front import DEFAULT_TAIL, ChatFront

    assert ChatFront(None, ()).tail == DEFAULT_TAIL > 8
    assert ChatFront(None, (), {"tail": 16}).tail == 16
    for bad in (0, -3, 2.5, True, "48"):
        with pytest.raises(ValueError, match="tail must be an int >= 1"):
            ChatFront(None, (), {"tail": bad})
