"""When the front end encodes a plain chat request's texts (kvcomm.vllm.frontend): while the
request runs - a streamed one's from its first output, a non-streamed one's from its start (the
engine gives it one output, at its end: vLLM's FINAL_ONLY) - since a framework sends the next
agent's request the moment a response ends, and that call would otherwise wait for the
encoding; its reply at the end. The moment is seen where the front end wraps the engine
client's generate (kvcomm.vllm.observe.CallReports), tied to the HTTP request by the engine
request id the front end knows."""
import asyncio
import json
from types import SimpleNamespace

import pytest

from kvcomm.vllm.frontend import KVCommFrontend, _engine_request_id
from kvcomm.vllm.observe import CallReports


STREAMED = SimpleNamespace(output_kind=SimpleNamespace(name="DELTA"))
WHOLE = SimpleNamespace(output_kind=SimpleNamespace(name="FINAL_ONLY"))


class _Client:
    """An engine client whose generate computes `tokens` tokens (each a pass of the event loop)
    and yields each one's output - only the last, finished one for a FINAL_ONLY request."""

    def __init__(self, tokens: int, fail_at: int | None = None):
        self.tokens, self.fail_at = tokens, fail_at

    async def generate(self, prompt, sampling_params, request_id):
        for i in range(self.tokens):
            await asyncio.sleep(0)
            if i == self.fail_at:
                raise RuntimeError("engine failed")
            last = i == self.tokens - 1
            if last or sampling_params is None or sampling_params.output_kind.name != "FINAL_ONLY":
                yield SimpleNamespace(finished=last, kv_transfer_params=None)


def _drive(stream: bool, encode_ahead: bool = True, status: int = 200, outputs: int = 3):
    """The events of one plain request: the engine's outputs, then the HTTP response (vLLM's
    server consumes generate, then sends; a stream interleaves them, which changes nothing here:
    the texts' encoding starts at the first output)."""
    events = []
    chat = SimpleNamespace(remember=lambda c, t, reply: events.append(("remember", reply)), encode_ahead=encode_ahead)
    reports = CallReports()
    client = _Client(outputs)
    reports.watch(client)
    engine = SimpleNamespace(chat=chat, reports=reports)
    front = KVCommFrontend(app=None)
    front._encode_ahead = lambda eng, c, tenant, data, reply, texts=True: events.append(("encode", reply, texts))

    async def send(msg):
        events.append(("sent", msg.get("more_body")) if msg["type"] == "http.response.body" else ("start",))

    rid = "chatcmpl-abc"
    wrapped = front._remember_plain(send, engine, object(), "tenant", {"stream": stream}, rid)
    if stream:
        chunks = [b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n',
                  b'data: {"choices":[{"delta":{"content":"The answer"}}]}\n\n',
                  b'data: {"choices":[{"delta":{"content":" is 4."}}]}\n\ndata: [DONE]\n\n']
    else:
        chunks = [json.dumps({"choices": [{"message": {"content": "The answer is 4."}}]}).encode()]
    msgs = [{"type": "http.response.start", "status": status}] + [
        {"type": "http.response.body", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def go():
        if status == 200:
            async for _ in client.generate(None, STREAMED if stream else WHOLE, rid):
                events.append(("output",))
        for m in msgs:
            await wrapped(m)
    asyncio.run(go())
    return events, reports


def test_a_streamed_plain_request_encodes_its_texts_at_its_first_output_and_its_reply_at_the_end():
    events, reports = _drive(stream=True)
    assert events[:4] == [("output",), ("remember", ""), ("encode", "", True), ("output",)]
    # at the end: the reply only; the texts are not laid out again
    assert events[-3:] == [("remember", "The answer is 4."), ("encode", "The answer is 4.", False), ("sent", False)]
    assert reports._when_free == {}


def test_a_non_streamed_plain_request_encodes_its_texts_from_its_start():
    # its one output comes at the end: waiting for it would encode the texts after the response
    events, reports = _drive(stream=False)
    assert events[:3] == [("remember", ""), ("encode", "", True), ("output",)]
    assert events.count(("output",)) == 1
    assert events[-3:] == [("remember", "The answer is 4."), ("encode", "The answer is 4.", False), ("sent", False)]
    assert reports._when_free == {}


def test_a_request_that_never_reached_the_engine_encodes_its_texts_at_the_end_and_leaves_nothing_behind():
    events = []
    chat = SimpleNamespace(remember=lambda c, t, reply: events.append(("remember", reply)), encode_ahead=True)
    reports = CallReports()
    front = KVCommFrontend(app=None)
    front._encode_ahead = lambda eng, c, tenant, data, reply, texts=True: events.append(("encode", reply, texts))

    async def send(msg):
        pass
    wrapped = front._remember_plain(send, SimpleNamespace(chat=chat, reports=reports), object(), "t", {}, "chatcmpl-x")
    assert "chatcmpl-x" in reports._when_free
    body = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()

    async def go():
        await wrapped({"type": "http.response.start", "status": 200})
        await wrapped({"type": "http.response.body", "body": body, "more_body": False})
    asyncio.run(go())
    assert events == [("remember", "ok"), ("encode", "ok", True)]
    assert reports._when_free == {}


def test_nothing_is_encoded_with_encode_ahead_off_or_for_an_error_response():
    for stream in (True, False):
        events, reports = _drive(stream=stream, encode_ahead=False)
        assert [e for e in events if e[0] == "encode"] == []
        assert reports._when_free == {}
        events, reports = _drive(stream=stream, status=400)
        assert [e for e in events if e[0] in ("encode", "remember")] == []
        assert reports._when_free == {}


def test_a_failing_or_aborted_engine_request_forgets_its_callback():
    reports = CallReports()
    ran = []
    client = _Client(3, fail_at=0)
    reports.watch(client)
    reports.when_free("r1", lambda: ran.append("r1"))
    reports.when_free("r2", lambda: ran.append("r2"))

    async def go():
        with pytest.raises(RuntimeError):
            async for _ in client.generate(None, STREAMED, "r1"):
                pass
        gen = client.generate(None, STREAMED, "r2")
        client.fail_at = None
        await gen.__anext__()   # first output: the callback runs
        await gen.aclose()      # the client went away
    asyncio.run(go())
    assert ran == ["r2"] and reports._when_free == {}


def test_a_callback_that_raises_does_not_fail_the_request():
    reports = CallReports()
    client = _Client(2)
    reports.watch(client)
    reports.when_free("r", lambda: 1 / 0)

    async def go():
        return [o async for o in client.generate(None, STREAMED, "r")]
    assert len(asyncio.run(go())) == 2


def test_the_engine_request_id_is_the_header_else_the_body_else_one_the_front_end_sets():
    body, rid = _engine_request_id({"headers": [(b"X-Request-Id", b"mine")]}, {"messages": []})
    assert rid == "chatcmpl-mine" and "request_id" not in body
    body, rid = _engine_request_id({"headers": []}, {"request_id": "given"})
    assert rid == "chatcmpl-given"
    body, rid = _engine_request_id({"headers": []}, {"messages": []})
    assert rid == f"chatcmpl-{body['request_id']}" and len(body["request_id"]) == 32
    other, rid2 = _engine_request_id({"headers": []}, {"messages": []})
    assert rid2 != rid
