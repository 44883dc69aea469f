"""One generated token more than a streamed KVCOMM call asked for, kept from its client.

A reply cut by max_tokens ends in a token that was sampled but never fed back through the
model: its KV does not exist, so the connector cannot capture the reply, and the next agent
that reads it computes it in context (docs/method.md, "Details"). The front end therefore
asks vLLM for max_tokens + 1 on a streamed KVCOMM call: the client's last token is then
fed, the connector captures the reply as the client sees it (its `reply_limit`), and the
front end drops the extra token from the stream - its ids, text and logprobs - and reports
the finish and usage plain vLLM would have reported for max_tokens.

Greedy or sampled, the first max_tokens tokens do not depend on a later one, and vLLM's
detokenizer emits a token's text once it decodes to whole characters, so the visible
stream is the one max_tokens gives. Requests this cannot keep exact are left as they are:
stop strings (one could match across the extra token), continuous usage stats, n > 1, no
max_tokens, min_tokens above it.
"""
from __future__ import annotations

import json


def extra_token_limit(data: dict) -> tuple[str, int] | None:
    """(the body's max-tokens field, the client's limit) when the request may be asked for
    one token more and trimmed exactly; else None."""
    if not data.get("stream"):
        return None
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    limit = data.get(key)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    options = data.get("stream_options") or {}
    if (data.get("stop") or data.get("n", 1) not in (1, None) or data.get("echo")
            or not isinstance(options, dict) or options.get("continuous_usage_stats")):
        return None
    least = data.get("min_tokens")
    if isinstance(least, int) and not isinstance(least, bool) and least > limit:
        return None
    return key, limit


class StreamTrim:
    """Rewrites a chat completion's server-sent events so that at most `limit` generated
    tokens reach the client. feed(body, more) -> what to send now (whole lines only, the
    rest held for the next message). `trimmed`: the extra token came and was dropped."""

    def __init__(self, limit: int, decode):
        self.limit = limit
        self.decode = decode      # token ids -> text, as the stream's deltas decode them
        self.seen = 0
        self.trimmed = False
        self._held = b""

    def feed(self, body: bytes, more: bool) -> bytes:
        data = self._held + body
        if more:
            cut = data.rfind(b"\n") + 1
            data, self._held = data[:cut], data[cut:]
        else:
            self._held = b""
        return b"\n".join(self._line(line) for line in data.split(b"\n"))

    def _line(self, line: bytes) -> bytes:
        text = line.strip()
        if not text.startswith(b"data:") or text == b"data: [DONE]":
            return line
        try:
            chunk = json.loads(text[5:])
        except ValueError:
            return line
        changed = False
        for choice in chunk.get("choices") or []:
            changed |= self._choice(choice)
        usage = chunk.get("usage")
        if self.trimmed and isinstance(usage, dict) and usage.get("completion_tokens"):
            usage["completion_tokens"] -= 1
            if isinstance(usage.get("total_tokens"), int):
                usage["total_tokens"] -= 1
            changed = True
        return b"data: " + json.dumps(chunk).encode() if changed else line

    def _choice(self, choice: dict) -> bool:
        ids = choice.get("token_ids") or []
        keep = max(0, min(len(ids), self.limit - self.seen))
        self.seen += keep
        changed = False
        if keep < len(ids):
            extra = ids[keep:]
            choice["token_ids"] = ids[:keep]
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                # The extra token's text ends this delta: alone in its chunk (the rule), its
                # chunk's whole text (vLLM emits a token's text once it decodes to whole
                # characters: what it completes, max_tokens would never have shown); beside
                # the client's last tokens (a busy server merges chunks), their decoding.
                tail = self.decode(extra)
                delta["content"] = ("" if keep == 0 else content[:-len(tail)]
                                    if tail and content.endswith(tail) else self.decode(ids[:keep]))
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                logprobs["content"] = logprobs["content"][:len(logprobs["content"]) - len(extra)]
            self.trimmed = changed = True
        if self.trimmed and choice.get("finish_reason") not in (None, "length"):
            choice["finish_reason"] = "length"   # the client's limit ended it (vLLM checks stops first)
            if choice.get("stop_reason") is not None:
                choice["stop_reason"] = None
            changed = True
        return changed
