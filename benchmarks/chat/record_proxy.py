"""A recording HTTP proxy between an agent framework and an OpenAI-compatible server.

    python benchmarks/chat/record_proxy.py --upstream http://127.0.0.1:8100 --port 8200 \\
        --out tests/fixtures/chat/autogen.jsonl

Everything is passed through unchanged (streamed responses, SSE included, chunk by chunk as
they arrive); every POST .../chat/completions is also appended to --out as one JSON line:

    {"conversation": k, "task": "...", "team": "...", "call": i, "t_request": unix s, "elapsed_s": s,
     "headers": {"authorization": bool, "user_agent": "...", "x-kvcomm-...": "..."},
     "request": <the body as sent>, "status": 200, "stream": bool,
     "response": {"text": "...", "finish_reason": "...", "tool_calls": [...], "usage": {...},
                  "final_chunk": <the stream's last data chunk>}}

The conversation a call belongs to is set out of band, so that the framework's own traffic
stays untouched: POST /_record/conversation {"conversation": k, "task": "...", ...} (the team
scripts' --record option does it before each conversation; every key of it is copied into the
records that follow). `call` counts calls within a conversation. Stdlib only: it runs in any environment.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Not forwarded: they describe one hop (RFC 9110 7.6.1), and the proxy sets its own framing.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


class Recorder:
    """Where records go, and the conversation the next call belongs to."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.labels = {"conversation": None, "task": None}
        self.calls = 0

    def mark(self, labels: dict) -> None:
        with self.lock:
            self.labels, self.calls = {"conversation": None, "task": None, **labels}, 0

    def next_call(self) -> dict:
        """The labels of the current conversation and this call's number in it."""
        with self.lock:
            i = self.calls
            self.calls += 1
            return {**self.labels, "call": i}

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def recorded_headers(headers) -> dict:
    """The request headers the server-side inference may care about: whether a key was sent
    (never the key itself), the client library, and any X-KVCOMM-* header."""
    out = {"authorization": headers.get("Authorization") is not None,
           "user_agent": headers.get("User-Agent")}
    for k, v in headers.items():
        if k.lower().startswith("x-kvcomm-"):
            out[k.lower()] = v
    return out


def summarize_json(body: dict) -> dict:
    """The recorded part of a non-streamed chat completion."""
    choice = (body.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    out = {"text": msg.get("content"), "finish_reason": choice.get("finish_reason")}
    if msg.get("tool_calls"):
        out["tool_calls"] = msg["tool_calls"]
    if body.get("usage"):
        out["usage"] = body["usage"]
    extra = {k: v for k, v in body.items()
             if k not in ("id", "object", "created", "model", "choices", "usage", "system_fingerprint")
             and v is not None}
    if extra:
        out["extra"] = extra
    return out


class StreamSummary:
    """Joins an SSE chat completion stream: the text of choice 0, its finish reason and tool
    call deltas, and the last data chunk as it was (usage and KVCOMM's report travel there)."""

    def __init__(self):
        self.text, self.finish_reason, self.final_chunk, self.chunks = [], None, None, 0
        self.tool_calls: dict[int, dict] = {}
        self._pending = b""

    def feed(self, data: bytes) -> None:
        self._pending += data
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            self._line(line.decode("utf-8", "replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            return
        self.chunks += 1
        self.final_chunk = chunk
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.text.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(tc.get("index", 0), {"id": None, "type": "function",
                                                                         "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def result(self) -> dict:
        out = {"text": "".join(self.text), "finish_reason": self.finish_reason, "chunks": self.chunks}
        if self.tool_calls:
            out["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        if self.final_chunk and self.final_chunk.get("usage"):
            out["usage"] = self.final_chunk["usage"]
        out["final_chunk"] = self.final_chunk
        return out


def make_handler(upstream: str, recorder: Recorder, timeout: float):
    up = urllib.parse.urlsplit(upstream)
    base_path = up.path.rstrip("/")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive, as the OpenAI clients expect

        def log_message(self, fmt, *args):   # one line per call is written by _proxy instead
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._proxy(b"")

        def do_DELETE(self):
            self._proxy(self._body())

        def do_POST(self):
            body = self._body()
            if self.path == "/_record/conversation":
                recorder.mark(json.loads(body or b"{}"))
                self._reply(200, b'{"ok": true}')
                return
            self._proxy(body)

        def _proxy(self, body: bytes) -> None:
            record = self.command == "POST" and self.path.split("?")[0].endswith("/chat/completions")
            # labelled on arrival: the client may mark its next conversation as soon as it has the
            # response, before this thread has written the record
            labels = recorder.next_call() if record else None
            t0 = time.time()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Accept-Encoding"] = "identity"   # the proxy reads what it forwards
            conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=timeout)
            try:
                conn.request(self.command, base_path + self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                self._reply(502, json.dumps({"error": f"record_proxy: upstream {upstream}: {e}"}).encode())
                conn.close()
                return
            ctype = resp.getheader("Content-Type", "")
            streamed = ctype.startswith("text/event-stream")
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            summary = StreamSummary() if streamed else None
            if streamed:
                # chunked to the client, each piece as soon as the server sends it
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    piece = resp.read1(65536)
                    if not piece:
                        break
                    summary.feed(piece)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                data = b""
            else:
                data = resp.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            self.wfile.flush()
            conn.close()
            if not record:
                return
            try:
                request = json.loads(body)
            except ValueError:
                request = body.decode("utf-8", "replace")
            if streamed:
                response = summary.result()
            else:
                try:
                    response = summarize_json(json.loads(data))
                except ValueError:
                    response = {"raw": data.decode("utf-8", "replace")}
            recorder.write({**labels, "t_request": round(t0, 3), "elapsed_s": round(time.time() - t0, 3),
                            "path": self.path, "headers": recorded_headers(self.headers),
                            "user": request.get("user") if isinstance(request, dict) else None,
                            "request": request, "status": resp.status, "stream": streamed, "response": response})
            print(f"record_proxy: conversation {labels['conversation']} call {labels['call']}: {resp.status} "
                  f"{'stream' if streamed else 'json'} {time.time() - t0:.1f} s", file=sys.stderr, flush=True)

    return Handler


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="the server, e.g. http://127.0.0.1:8100")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8200)
    ap.add_argument("--out", required=True, help="JSONL file the records are appended to")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server per call")
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.upstream, Recorder(args.out), args.timeout))
    print(f"record_proxy: http://{args.host}:{server.server_address[1]} -> {args.upstream}, recording to {args.out}",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
