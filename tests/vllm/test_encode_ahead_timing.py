"""When the front end encodes a plain chat request's texts (kvcomm.vllm.frontend): a streamed
request's texts from its first chunk, while it still decodes - a framework sends the next
agent's request the moment a response ends, and that call would otherwise wait for the
encoding - and its reply at the end; a non-streamed request's texts and reply at the end."""
import asyncio
import json
from types import SimpleNamespace

from kvcomm.vllm.frontend import KVCommFrontend


def _drive(stream: bool, encode_ahead: bool = True, status: int = 200):
    events = []
    chat = SimpleNamespace(remember=lambda c, t, reply: events.append(("remember", reply)), encode_ahead=encode_ahead)
    engine = SimpleNamespace(chat=chat)
    front = KVCommFrontend(app=None)
    front._encode_ahead = lambda eng, c, tenant, data, reply, texts=True: events.append(("encode", reply))

    async def send(msg):
        events.append(("sent", msg.get("more_body")) if msg["type"] == "http.response.body" else ("start",))

    wrapped = front._remember_plain(send, engine, object(), "tenant", {"stream": stream})
    if stream:
        chunks = [b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n',
                  b'data: {"choices":[{"delta":{"content":"The answer"}}]}\n\n',
                  b'data: {"choices":[{"delta":{"content":" is 4."}}]}\n\ndata: [DONE]\n\n']
    else:
        chunks = [json.dumps({"choices": [{"message": {"content": "The answer is 4."}}]}).encode()]
    msgs = [{"type": "http.response.start", "status": status}] + [
        {"type": "http.response.body", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def go():
        for m in msgs:
            await wrapped(m)
    asyncio.run(go())
    return events


def test_a_streamed_plain_request_encodes_its_texts_at_its_first_chunk_and_its_reply_at_the_end():
    events = _drive(stream=True)
    assert events == [("start",), ("sent", True), ("remember", ""), ("encode", ""), ("sent", True),
                      ("remember", "The answer is 4."), ("encode", "The answer is 4."), ("sent", False)]


def test_a_non_streamed_plain_request_encodes_everything_at_the_end():
    assert _drive(stream=False) == [("start",), ("remember", "The answer is 4."), ("encode", "The answer is 4."),
                                    ("sent", False)]


def test_nothing_is_encoded_with_encode_ahead_off_or_for_an_error_response():
    assert ("encode", "") not in _drive(stream=True, encode_ahead=False)
    assert [e for e in _drive(stream=True, encode_ahead=False) if e[0] == "encode"] == []
    assert [e for e in _drive(stream=True, status=400) if e[0] in ("encode", "remember")] == []
