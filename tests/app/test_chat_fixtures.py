"""The recorded agent-framework traffic (tests/fixtures/chat/, made by benchmarks/chat/record.sh)
has the shape tests/fixtures/chat/README.md describes - the facts the server-side inference of
shared contents is built on. A re-recording with other framework versions that changes the
shape fails here, and the README (and the inference) must follow it. Needs no framework and no
server: the fixtures are JSON, and the recording proxy is tested against a stub upstream on
loopback threads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "chat"
MODEL = "SmolLM2-135M-Instruct"
AGENTS = ("solver", "critic", "summarizer")
# The agents' system messages (benchmarks/chat/*_team.py SYSTEM), the same in both teams.
AGENT_OF_SYSTEM = re.compile(r"^You are the (solver|critic|summarizer) in a team of three agents\. ")
SELECTOR_PROMPT = "You are in a role play game. The following roles are available:\n"


def _load(name: str) -> list[dict]:
    with open(FIX / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tasks() -> dict:
    with open(FIX / "tasks.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module", params=["autogen", "langgraph"])
def framework(request) -> str:
    return request.param


def _conversations(records: list[dict]) -> dict[int, list[dict]]:
    convs: dict[int, list[dict]] = {}
    for r in records:
        convs.setdefault(r["conversation"], []).append(r)
    return {k: sorted(v, key=lambda r: r["call"]) for k, v in sorted(convs.items())}


def _agent(request: dict) -> str | None:
    """The agent a call is from, by its system message; None for a call without one (AutoGen's
    speaker selection)."""
    first = request["messages"][0]
    if first["role"] != "system":
        return None
    m = AGENT_OF_SYSTEM.match(first["content"])
    assert m, f"a system message of no known agent: {first['content'][:80]!r}"
    return m.group(1)


def _task(tasks: dict, task_id: str) -> dict:
    return next(t for t in tasks["tasks"] if t["id"] == task_id)


def test_files_are_small_and_whole(framework):
    path = FIX / f"{framework}.jsonl"
    assert path.stat().st_size < 1_000_000
    records = _load(f"{framework}.jsonl")
    convs = _conversations(records)
    assert len(convs) >= 6
    for k, calls in convs.items():
        assert [c["call"] for c in calls] == list(range(len(calls))), f"conversation {k}: calls missing"
        assert len({c["task"] for c in calls}) == 1
        for c in calls:
            assert c["framework"] == framework and c["status"] == 200 and c["path"] == "/v1/chat/completions"
            assert c["request"]["model"] == MODEL and c["request"]["temperature"] == 0
            assert c["response"]["finish_reason"] in ("stop", "length", "tool_calls")


def test_headers_name_no_session_and_carry_a_key(framework):
    """Nothing in the traffic names a session or an agent: no X-KVCOMM-* header, no `user`
    field; the API key (any string) is always sent."""
    for c in _load(f"{framework}.jsonl"):
        assert c["headers"]["authorization"] is True
        assert not [h for h in c["headers"] if h.startswith("x-kvcomm-")]
        assert "user" not in c["request"] and c["user"] is None
        assert c["headers"]["user_agent"].startswith(("OpenAI/Python", "AsyncOpenAI/Python"))


def test_every_agent_call_is_its_system_message_then_the_task(framework, tasks):
    """One system message, first, per agent call; then the task as a user message (AutoGen
    names it "user", LangGraph sends no name), the same text in every call of a conversation."""
    for k, calls in _conversations(_load(f"{framework}.jsonl")).items():
        task = _task(tasks, calls[0]["task"])
        agent_calls = [c for c in calls if _agent(c["request"]) is not None]
        assert agent_calls
        seen = set()
        for c in agent_calls:
            msgs = c["request"]["messages"]
            seen.add(_agent(c["request"]))
            assert [m["role"] for m in msgs].count("system") == 1
            first_user = msgs[1]
            assert first_user["role"] == "user"
            assert first_user.get("name") == ("user" if framework == "autogen" else None)
            assert task["question"] in first_user["content"]
            if task["kind"] == "squad":
                assert task["passage"] in first_user["content"]
        assert len({c["request"]["messages"][1]["content"] for c in agent_calls}) == 1
        if calls[0].get("team") != "selector":
            assert seen == set(AGENTS), f"conversation {k}"
    # one system text per agent, the same in every call and conversation
    systems = {_agent(c["request"]): set() for c in _load(f"{framework}.jsonl") if _agent(c["request"])}
    for c in _load(f"{framework}.jsonl"):
        if _agent(c["request"]):
            systems[_agent(c["request"])].add(c["request"]["messages"][0]["content"])
    assert sorted(systems) == sorted(AGENTS) and all(len(v) == 1 for v in systems.values())


def test_shared_texts_recur_across_conversations(framework, tasks):
    """The same passage (two questions on it) and the same tool result (two questions answered
    from it) reach the server in more than one conversation, byte for byte."""
    records = _load(f"{framework}.jsonl")
    by_passage: dict[str, set] = {}
    for c in records:
        task = _task(tasks, c["task"])
        if task["kind"] == "squad" and c["team"] != "selector":
            by_passage.setdefault(task["passage"], set()).add(c["conversation"])
    assert max(len(v) for v in by_passage.values()) >= 2
    lookup = next(iter(tasks["lookup"].values()))
    with_lookup = {c["conversation"] for c in records
                   if any(m.get("content") == lookup for m in c["request"]["messages"])}
    assert len(with_lookup) >= 2


def _turns(calls: list[dict]) -> list[tuple[str, dict]]:
    """(agent, the call that ended its turn) of a conversation's agent calls, in order: a call
    answered with a tool call is followed by the same agent's call that reads the result
    (LangGraph) or ends the turn itself (AutoGen: the tool result is the turn's message)."""
    return [(_agent(c["request"]), c) for c in calls if _agent(c["request"]) is not None]


def _tool_result(msgs: list[dict], call_id: str) -> str:
    return next(m["content"] for m in msgs if m["role"] == "tool" and m.get("tool_call_id") == call_id)


def test_autogen_history(tasks):
    """AutoGen (RoundRobinGroupChat and SelectorGroupChat alike): an agent's call is [its system
    message, the task as user "user", then every earlier turn in order]: another agent's reply
    as {"role": "user", "name": <agent>, "content": <its reply, verbatim>}, the agent's own
    earlier reply as {"role": "assistant"} without a name; a turn that called the tool is, for
    the others, a user message named after the caller whose content is the tool's result, and
    for the caller its assistant tool_calls message (the server's arguments, verbatim) then the
    {"role": "tool"} result."""
    lookup = next(iter(tasks["lookup"].values()))
    for k, calls in _conversations(_load("autogen.jsonl")).items():
        turns = _turns(calls)
        done: list[tuple[str, dict]] = []   # (agent, response) of the turns before this call
        for agent, c in turns:
            msgs = c["request"]["messages"]
            expected = []
            for who, resp in done:
                if resp.get("tool_calls"):
                    tc = resp["tool_calls"][0]
                    if who == agent:
                        expected.append({"role": "assistant", "content": None,
                                         "tool_calls": [{"id": tc["id"], "type": "function",
                                                         "function": tc["function"]}]})
                        expected.append({"role": "tool", "content": lookup, "tool_call_id": tc["id"]})
                    else:
                        expected.append({"role": "user", "name": who, "content": lookup})
                elif who == agent:
                    expected.append({"role": "assistant", "content": resp["text"]})
                else:
                    expected.append({"role": "user", "name": who, "content": resp["text"]})
            assert msgs[2:] == expected, f"conversation {k} call {c['call']} ({agent})"
            done.append((agent, c["response"]))
        if any(resp.get("tool_calls") for _, resp in done):
            # the forced first call names the tool; later calls of the same agent send "auto"
            tool_calls = [c for _, c in turns if "tools" in c["request"]]
            assert tool_calls[0]["request"]["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
            assert all(c["request"]["tool_choice"] == "auto" for c in tool_calls[1:])


def test_autogen_selector_embeds_the_transcript_in_one_user_message(tasks):
    """SelectorGroupChat's speaker selection is a call with no system message: one user message
    ("user") holding the roles and the whole conversation as text, each turn as
    "<source>: <text>" (trailing whitespace stripped) - the task under "user"; a failed pick is
    retried with the model's answer (assistant, no name) and a user "No valid name" message."""
    records = _load("autogen.jsonl")
    selector_convs = {k: v for k, v in _conversations(records).items() if v[0]["team"] == "selector"}
    assert selector_convs
    for k, calls in selector_convs.items():
        task_text = next(c for c in calls if _agent(c["request"]))["request"]["messages"][1]["content"]
        replies: list[tuple[str, str]] = [("user", task_text)]
        for c in calls:
            msgs = c["request"]["messages"]
            agent = _agent(c["request"])
            if agent is not None:
                replies.append((agent, c["response"]["text"]))
                continue
            prompt = msgs[0]
            assert prompt["role"] == "user" and prompt.get("name") == "user"
            assert prompt["content"].startswith(SELECTOR_PROMPT)
            for who, text in replies:
                assert f"{who}: {text}".rstrip() + "\n\n" in prompt["content"], f"conversation {k} call {c['call']}"
            for retry in range(1, len(msgs), 2):
                assert msgs[retry]["role"] == "assistant" and "name" not in msgs[retry]
                assert msgs[retry + 1]["role"] == "user"
                assert msgs[retry + 1]["content"].startswith("No valid name was mentioned.")


def test_langgraph_history(tasks):
    """LangGraph (one shared message list): an agent's call is [its system message, the task as
    a user message without a name, then every message so far]: each agent's reply - its own and
    the others' alike - as {"role": "assistant", "name": <agent>, "content": <its reply,
    verbatim>}; the solver's tool call as an assistant message named "solver" with content None
    and tool_calls whose arguments LangChain re-serialized (not the server's text), then
    {"role": "tool", "tool_call_id", "content": <the tool's result>} - in every later call of
    every agent."""
    lookup = next(iter(tasks["lookup"].values()))
    for k, calls in _conversations(_load("langgraph.jsonl")).items():
        done: list[dict] = []
        for c in calls:
            agent = _agent(c["request"])
            msgs = c["request"]["messages"]
            assert msgs[2:] == done, f"conversation {k} call {c['call']} ({agent})"
            resp = c["response"]
            if resp.get("tool_calls"):
                tc = resp["tool_calls"][0]
                done.append({"role": "assistant", "name": agent, "content": None,
                             "tool_calls": [{"type": "function", "id": tc["id"],
                                             "function": {"name": "lookup",
                                                          "arguments": json.dumps(json.loads(tc["function"]["arguments"]))}}]})
                done.append({"role": "tool", "content": lookup, "tool_call_id": tc["id"]})
            else:
                done.append({"role": "assistant", "name": agent, "content": resp["text"]})


def test_langgraph_reserializes_tool_arguments():
    """The tool call's arguments reach later calls re-serialized by LangChain: equal as JSON,
    not as text, to what the server generated (so they are not a verbatim earlier reply)."""
    records = _load("langgraph.jsonl")
    pairs = []
    for calls in _conversations(records).values():
        for i, c in enumerate(calls):
            for tc in c["response"].get("tool_calls") or []:
                later = calls[i + 1]["request"]["messages"]
                sent = next(m for m in later if m.get("tool_calls"))["tool_calls"][0]["function"]["arguments"]
                pairs.append((tc["function"]["arguments"], sent))
    assert pairs
    for generated, sent in pairs:
        assert json.loads(generated) == json.loads(sent)
        assert generated != sent


def test_tool_calls_carry_the_tool_schema_and_a_named_choice(framework, tasks):
    """Only the solver sends tools, on the tool tasks; the first call names the tool (the teams
    force it), and the server's reply is a tool call of `lookup` on the task's topic."""
    for calls in _conversations(_load(f"{framework}.jsonl")).values():
        task = _task(tasks, calls[0]["task"])
        with_tools = [c for c in calls if "tools" in c["request"]]
        if task["kind"] != "tool":
            assert not with_tools
            continue
        assert with_tools and all(_agent(c["request"]) == "solver" for c in with_tools)
        first = with_tools[0]
        (tool,) = first["request"]["tools"]
        assert tool["type"] == "function" and tool["function"]["name"] == "lookup"
        assert first["request"]["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
        (tc,) = first["response"]["tool_calls"]
        assert json.loads(tc["function"]["arguments"]) == {"topic": task["topic"]}


def test_streaming(framework):
    """AutoGen was recorded unstreamed, LangGraph streamed: its records keep the joined text and
    the stream's last chunk (where usage or KVCOMM's report travel)."""
    for c in _load(f"{framework}.jsonl"):
        assert c["stream"] is (framework == "langgraph")
        assert bool(c["request"].get("stream")) is c["stream"]
        assert "stream_options" not in c["request"]   # so a stream carries no usage
        if c["stream"]:
            assert c["response"]["chunks"] > 0 and c["response"]["final_chunk"]["object"] == "chat.completion.chunk"
        # the token limit: AutoGen sends max_tokens, langchain-openai max_completion_tokens
        key = "max_tokens" if framework == "autogen" else "max_completion_tokens"
        assert c["request"][key] == 48 and len({"max_tokens", "max_completion_tokens"} & set(c["request"])) == 1


def test_tasks_file_is_what_make_tasks_writes():
    """tasks.json is benchmarks/chat/make_tasks.py's output on the project's datasets: the
    fixtures' shared texts (passages, the tool's result) are the ones the generator picks."""
    import importlib.util

    from kvcomm_app.runtime.datasets import DataNotInstalled
    path = FIX.parents[2] / "benchmarks" / "chat" / "make_tasks.py"
    spec = importlib.util.spec_from_file_location("chat_make_tasks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        built = mod.build()
    except DataNotInstalled as e:
        pytest.skip(str(e))
    with open(FIX / "tasks.json", encoding="utf-8") as f:
        assert json.load(f) == built
    kinds = [t["kind"] for t in built["tasks"]]
    assert kinds.count("squad") >= 3 and kinds.count("gsm8k") >= 2 and kinds.count("tool") >= 2
    squad = [t["passage"] for t in built["tasks"] if t["kind"] == "squad"]
    assert len(set(squad)) < len(squad)   # a passage shared by two tasks


# The recording proxy (benchmarks/chat/record_proxy.py), in this process: a stub upstream and
# the proxy on loopback threads.

def _record_proxy():
    import importlib.util
    path = FIX.parents[2] / "benchmarks" / "chat" / "record_proxy.py"
    spec = importlib.util.spec_from_file_location("chat_record_proxy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


@pytest.fixture
def proxied(tmp_path):
    """(proxy port, records path, event the stub's stream waits on before its last chunks)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    rp = _record_proxy()
    release = threading.Event()

    class Stub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not body.get("stream"):
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                                "finish_reason": "length"}], "kv_transfer_params": {"x": 1}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(d):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(d), d))
                self.wfile.flush()
            chunk(_sse({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}))
            # the rest only once the client has read the first piece through the proxy: a proxy
            # that buffered the stream would never pass this
            release.wait(10)
            chunk(_sse({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}))
            chunk(_sse({"choices": [], "usage": {"prompt_tokens": 3}}) + b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

    stub = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    out = tmp_path / "calls.jsonl"
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), rp.make_handler(f"http://127.0.0.1:{stub.server_address[1]}",
                                                                  rp.Recorder(str(out)), 10.0))
    for s in (stub, proxy):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield proxy.server_address[1], out, release
    finally:
        release.set()
        for s in (stub, proxy):
            s.shutdown()
            s.server_close()


def _post(port, path, body, headers=None):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def test_record_proxy_passes_through_and_records(proxied):
    import time
    port, out, release = proxied
    conn, resp = _post(port, "/_record/conversation", {"conversation": 4, "task": "t", "team": "x"})
    assert resp.status == 200 and json.loads(resp.read())["ok"]
    conn, resp = _post(port, "/v1/chat/completions", {"model": "m", "messages": [], "user": "u"},
                       {"Authorization": "Bearer k", "X-KVCOMM-Session": "s1"})
    assert json.loads(resp.read())["choices"][0]["message"]["content"] == "hi"
    conn, resp = _post(port, "/v1/chat/completions", {"model": "m", "messages": [], "stream": True})
    assert resp.getheader("Content-Type") == "text/event-stream"
    first = resp.read1(65536)
    assert b"Hel" in first and b"[DONE]" not in first   # forwarded before the stream ended
    # the next conversation is marked before the stream ends: the call keeps its own labels
    _post(port, "/_record/conversation", {"conversation": 5, "task": "u"})[1].read()
    release.set()
    rest = resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    for _ in range(100):   # the record is written after the last byte went to the client
        if len(out.read_text().splitlines()) == 2:
            break
        time.sleep(0.05)
    plain, streamed = [json.loads(line) for line in out.read_text().splitlines()]
    assert plain["conversation"] == 4 and plain["task"] == "t" and plain["team"] == "x" and plain["call"] == 0
    assert plain["headers"] == {"authorization": True, "user_agent": None,
                                "x-kvcomm-session": "s1"}
    assert plain["user"] == "u" and plain["stream"] is False
    assert plain["response"] == {"text": "hi", "finish_reason": "length", "extra": {"kv_transfer_params": {"x": 1}}}
    assert streamed["conversation"] == 4 and streamed["call"] == 1 and streamed["stream"] is True
    assert streamed["headers"]["authorization"] is False
    r = streamed["response"]
    assert (r["text"], r["finish_reason"], r["chunks"], r["usage"]) == ("Hello", "stop", 3, {"prompt_tokens": 3})
    assert r["final_chunk"] == {"choices": [], "usage": {"prompt_tokens": 3}}
