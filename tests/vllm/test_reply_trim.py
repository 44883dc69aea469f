"""The extra token of a streamed KVCOMM call, kept from its client (kvcomm.vllm.reply_trim):
which requests get one, and the rewritten stream - ids, text, logprobs, finish, usage - as
plain vLLM streams it for max_tokens, whole lines only, whatever the message boundaries."""
import json

import pytest

from kvcomm.vllm.reply_trim import StreamTrim, extra_token_limit

WORDS = {1: "The", 2: " answer", 3: " is", 4: " 29", 5: ".", 9: "</s>"}


def decode(ids):
    return "".join(WORDS[i] for i in ids if i != 9)


def event(ids, finish=None, usage=None, logprobs=True):
    choice = {"index": 0, "delta": {"content": decode(ids)}, "token_ids": list(ids), "finish_reason": finish}
    if logprobs:
        choice["logprobs"] = {"content": [{"token": WORDS[i], "logprob": -0.1} for i in ids]}
    return {"id": "c1", "choices": [choice], **({"usage": usage} if usage else {})}


def sse(events):
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def parse(body):
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def summary(chunks):
    ids, text, finish, usage, lps = [], "", None, None, []
    for c in chunks:
        for ch in c["choices"]:
            ids += ch.get("token_ids") or []
            text += (ch.get("delta") or {}).get("content") or ""
            finish = ch.get("finish_reason") or finish
            lps += ((ch.get("logprobs") or {}).get("content") or [])
        usage = c.get("usage") or usage
    return ids, text, finish, usage, len(lps)


@pytest.mark.parametrize("data, expected", [
    ({"stream": True, "max_tokens": 16}, ("max_tokens", 16)),
    ({"stream": True, "max_completion_tokens": 8, "max_tokens": 16}, ("max_completion_tokens", 8)),
    ({"stream": True, "max_tokens": 16, "stream_options": {"include_usage": True}}, ("max_tokens", 16)),
    ({"stream": False, "max_tokens": 16}, None),                      # not streamed: left as it is
    ({"stream": True}, None),                                          # no limit: nothing is cut
    ({"stream": True, "max_tokens": 16, "stop": ["\n\n"]}, None),      # a stop string may span the extra token
    ({"stream": True, "max_tokens": 16, "n": 2}, None),
    ({"stream": True, "max_tokens": 16, "stream_options": {"continuous_usage_stats": True}}, None),
    ({"stream": True, "max_tokens": 4, "min_tokens": 5}, None),        # vLLM's own refusal stays
    ({"stream": True, "max_tokens": True}, None),
    ({"stream": True, "max_tokens": 0}, None),
])
def test_which_requests_get_an_extra_token(data, expected):
    assert extra_token_limit(data) == expected


@pytest.mark.parametrize("split", [None, 7, 1])
def test_the_extra_token_is_kept_from_the_stream(split):
    usage = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    body = sse([event([1]), event([2]), event([3]), event([4], "length"), {"id": "c1", "choices": [], "usage": usage}])
    trim = StreamTrim(3, decode)
    if split is None:
        out = trim.feed(body, False)
    else:   # the body in messages of `split` bytes: only whole lines leave, the rest is held
        parts = [body[i:i + split] for i in range(0, len(body), split)]
        out = b"".join(trim.feed(p, i < len(parts) - 1) for i, p in enumerate(parts))
    ids, text, finish, usage, n_lp = summary(parse(out))
    assert (ids, text, finish, n_lp) == ([1, 2, 3], "The answer is", "length", 3)
    assert usage == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert trim.trimmed and out.endswith(b"data: [DONE]\n\n")


def test_a_stop_token_as_the_extra_token_ends_at_the_limit():
    """The model's end token came as token max_tokens + 1: plain vLLM stopped at max_tokens."""
    trim = StreamTrim(2, decode)
    ids, text, finish, _, _ = summary(parse(trim.feed(sse([event([1]), event([2]), event([9], "stop")]), False)))
    assert (ids, text, finish) == ([1, 2], "The answer", "length")


def test_merged_chunks_are_split_at_the_limit():
    """A busy server merges tokens into one chunk: the client's tokens stay, the extra one goes."""
    trim = StreamTrim(3, decode)
    ids, text, finish, _, n_lp = summary(parse(trim.feed(sse([event([1]), event([2, 3, 4], "length")]), False)))
    assert (ids, text, finish, n_lp) == ([1, 2, 3], "The answer is", "length", 3)


def test_a_reply_that_ends_before_the_limit_passes_unchanged():
    body = sse([event([1]), event([2]), event([9], "stop")])
    trim = StreamTrim(5, decode)
    assert trim.feed(body, False) == body and not trim.trimmed
