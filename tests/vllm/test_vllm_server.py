"""The OpenAI-compatible server with KVCOMM (`python -m kvcomm.vllm.vllm_cli serve` with the
connector and the front end), driven over HTTP by kvcomm.vllm.client:
- bad KVCOMM parameters get HTTP 400 with a message, and the server keeps serving;
- plain OpenAI requests (no KVCOMM parameters) are ordinary vLLM;
- a 3-agent graph over 10 questions with 4 graphs in flight: every request answered, some
  calls reuse, and the outputs equal the same graph run one question at a time."""
import concurrent.futures as cf

import pytest

from kvcomm.vllm.client import ServerError

AGENTS = [
    ("analyst", "You are a careful math tutor.",
     "Solve this problem.\nProblem:\n{user_question}\nReply with the final number only."),
    ("checker", "You double-check arithmetic.",
     "Check this problem carefully.\nProblem:\n{user_question}\nGive only the answer."),
    ("judge", "You pick the right answer.",
     "Problem:\n{user_question}\nFirst answer:\n{agent_analyst_current}\nSecond answer:\n"
     "{agent_checker_current}\nWhich answer is right? Reply with the number."),
]
WARM = ["What is 12 plus 7?", "A farmer has 3 cows and buys 5 more. How many cows does he have?",
        "Tom has 20 apples and eats 4. How many apples are left?", "A box holds 6 eggs. How many eggs are in 4 boxes?"]
QUESTIONS = ["What is 9 times 8?", "What is 100 minus 37?", "What is 7 times 6?", "What is 45 plus 17?",
             "Sara has 15 pens and gives away 6. How many pens remain?", "What is 81 divided by 9?",
             "A bus has 30 seats and 12 are taken. How many are free?", "What is 14 plus 29?",
             "What is 11 times 11?", "Ann reads 5 pages a day. How many pages in 6 days?"]


@pytest.fixture(scope="module")
def client(server):
    for a in AGENTS:
        server.add_agent(*a)
    return server


def graph(client, question: str, learn: bool):
    eng = client.engine(learn=learn)
    eng.new_request()
    a = eng.call("analyst", {"user_question": question}, max_new_tokens=6)
    b = eng.call("checker", {"user_question": question}, max_new_tokens=6)
    c = eng.call("judge", {"user_question": question, "agent_analyst_current": a.text.strip() or "none",
                           "agent_checker_current": b.text.strip() or "none"}, max_new_tokens=4)
    return [(x.agent, x.path, x.text) for x in (a, b, c)]


def body(client, params, content="Problem:\nhello", **extra):
    return {"model": client.model, "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "kv_transfer_params": {"kvcomm": params}, **extra}


GOOD = {"agent": "x", "template": "Problem:\n{user_question}", "slots": {"user_question": [9, 14]}, "session": "s"}


@pytest.mark.parametrize("params, needle", [
    (dict(GOOD, slots={"user_question": [9, 14], "agent_y_current": [0, 1]}), "unknown slot"),
    (dict(GOOD, slots={"user_question": [9, 99]}), "outside the user message"),
    (dict(GOOD, slots={"user_question": ["9", 14]}), "must be an integer"),
    (dict(GOOD, agent=["x"]), "agent must be a name"),
    (dict(GOOD, round="first"), "round must be an integer"),
    (dict(GOOD, _server={"op": "encode"}), "may only be set by the server"),
    ("not an object", "kv_transfer_params.kvcomm must be an object"),
])
def test_bad_params_get_400_and_the_server_keeps_serving(client, params, needle):
    with pytest.raises(ServerError) as e:
        client.post("/v1/chat/completions", body(client, params))
    assert e.value.status == 400 and needle in e.value.message
    ok = client.post("/v1/chat/completions", body(client, GOOD))
    assert ok["choices"][0]["message"]["content"] is not None
    assert ok["kv_transfer_params"]["kvcomm"]["path"] in ("dense", "partial", "reuse")


def test_plain_requests_are_ordinary_vllm(client):
    msgs = [{"role": "user", "content": "Name a color."}]
    r = client.post("/v1/chat/completions", {"model": client.model, "messages": msgs, "max_tokens": 6,
                                              "temperature": 0})
    r2 = client.post("/v1/chat/completions", {"model": client.model, "messages": msgs, "max_tokens": 6,
                                               "temperature": 0, "kv_transfer_params": {"other": 1}})
    assert r["choices"][0]["message"]["content"] == r2["choices"][0]["message"]["content"]
    assert r.get("kv_transfer_params") is None


def test_concurrent_graphs_equal_sequential(client):
    # Warm the pool (learning), then run the measured questions with the pool frozen
    # (learn=False): a learning pool changes with arrival order, so only a frozen pool
    # makes "concurrent = sequential" a property of the server rather than of timing.
    for q in WARM:
        graph(client, q, learn=True)
    sequential = [graph(client, q, learn=False) for q in QUESTIONS]
    errors = []
    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        futs = [ex.submit(graph, client, q, False) for q in QUESTIONS]
        concurrent = []
        for f in futs:
            try:
                concurrent.append(f.result())
            except Exception as e:   # a lost or failed request
                errors.append(repr(e))
                concurrent.append(None)
    assert not errors
    calls = [c for g in concurrent for c in g]
    assert len(calls) == 3 * len(QUESTIONS)
    reuse = sum(path == "reuse" for _, path, _ in calls)
    print(f"reuse {reuse}/{len(calls)}; paths {[p for _, p, _ in calls]}")
    assert reuse > 0
    assert concurrent == sequential


def test_eval_backend_vllm_runs_the_runtime_graph(client, tmp_path):
    """`kvcomm eval --backend vllm --server URL`: the runtime's graph (one worker and the
    decision agent) over one warm-up and one measured GSM8K question, dense (plain vLLM)
    and KVCOMM, every call answered by the server."""
    import json

    from kvcomm_app.cli import main
    from kvcomm_app.runtime.records import read_record_dicts
    records = tmp_path / "records.jsonl"
    rc = main(["eval", "--task", "gsm8k", "--backend", "vllm", "--server", f"http://{client.host}:{client.port}",
               "--agents", "1", "--questions", "1", "--warmup", "1", "--max-new-tokens", "4",
               "--no-judge-shadow", "--no-progress", "--records", str(records), "--json", str(tmp_path / "s.json")])
    assert rc == 0
    recs = read_record_dicts(str(records))
    assert sorted((r["phase"], r["mode"]) for r in recs) == \
        [("measure", "dense"), ("measure", "kvcomm"), ("warmup", "dense"), ("warmup", "kvcomm")]
    calls = [(r["mode"], c["path"], c["new_tokens"]) for r in recs for c in r["calls"]]
    assert len(calls) == 8, calls                      # 2 questions x 2 modes x 2 agents
    assert {p for m, p, _ in calls if m == "dense"} == {"baseline"}          # plain vLLM
    assert {p for m, p, _ in calls if m == "kvcomm"} <= {"dense", "partial", "reuse"}   # through the connector
    assert all(n >= 1 for _, _, n in calls)
    assert json.loads((tmp_path / "s.json").read_text())["questions"] == 1


def test_a_streamed_reply_cut_by_max_tokens_streams_as_plain_and_is_captured(client):
    """A streamed KVCOMM call asks vLLM for one token more than max_tokens, which the front end
    keeps from the client (kvcomm.vllm.reply_trim): the client gets what plain vLLM streams for
    max_tokens - the same ids and text, finish "length", usage counting max_tokens - and the
    reply, its last token now fed through the model, is captured: the judge reading it reuses
    the captured KV instead of being the reply's first carrier."""
    from kvcomm.vllm.client import DENSE
    q = "Lena buys 3 boxes of 12 markers and gives 7 markers away. How many markers does she keep?"
    for limit in (1, 3):
        session = f"cut-{limit}"
        a = client.call("analyst", {"user_question": q}, session=session, max_tokens=limit)
        plain = client.call("analyst", {"user_question": q}, mode=DENSE, max_tokens=limit)
        assert a.finish_reason == plain.finish_reason == "length", (a.finish_reason, plain.finish_reason)
        assert a.token_ids == plain.token_ids and len(a.token_ids) == limit
        assert a.new_tokens == limit                                   # usage.completion_tokens
        assert a.kv.get("path") and a.text == plain.text, (a.text, plain.text)
        b = client.call("checker", {"user_question": q}, session=session, max_tokens=4)
        judge = client.call("judge", {"user_question": q, "agent_analyst_current": a.text.strip(),
                                      "agent_checker_current": b.text.strip() or "none"},
                            session=session, max_tokens=2)
        decided = judge.slot_decisions.get("agent_analyst_current", "")
        assert decided and "first carrier" not in decided, judge.slot_decisions
