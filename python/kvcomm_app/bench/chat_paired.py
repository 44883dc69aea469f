"""`kvcomm bench chat`: agent-framework traffic through `kvcomm serve`, every call paired with
plain vLLM on identical inputs, over the wire.

    build/venv-vllm/bin/python benchmarks/chat_paired.py --traffic tests/fixtures/chat/autogen.jsonl

The traffic is a recording of a framework's requests (JSON lines with "conversation" and
"request": the chat-completion body it sent; benchmarks/chat/record_proxy.py writes them). Each
request is sent twice, in the order recorded, to one server, carrying the replies this server
gave earlier in the conversation where they differ from the recorded ones (as the framework
would have passed them on; `--recorded-replies` sends the recording unchanged):

- as the framework sent it (one tenant, the API key `kvcomm`): KVCOMM where the server knows
  parts of it, plain where it knows nothing;
- the identical body from a tenant the server has never seen (a fresh API key per request):
  nothing is known to it, so it is plain vLLM - prefix caching on - the baseline a user runs.
  These requests carry one cache_salt of their own: they share vLLM's prefix cache among
  themselves (the same agent's earlier turns are cached, as for a plain server) but never hit
  blocks the KVCOMM tenant's requests computed (a request's identical twin).

Both are streamed (with --as-sent: streamed or not, as the framework sent them; a non-streamed
call has no TTFT and is compared on its whole time), greedy, with the first token's top
log-probabilities. A conversation's
KVCOMM calls go back to back, as the framework sent them; once the server is idle (/metrics:
no request and no KVCOMM background work in flight) its plain twins go back to back. So the
work KVCOMM does off a call's critical path (encoding a text for the agents after it, template
passes) runs beside the KVCOMM calls after it, as for a framework, and never slows a plain
twin. Per call: the path; the tokens reused after the agent's own
prefix (its system messages) in both modes (KVCOMM's include what vLLM's prefix cache gave
it; plain's are its prefix-cache hits, which vLLM reports with --enable-prompt-tokens-details);
TTFT in both modes; and the first token of both (agreement, and KL(plain || KVCOMM) over
plain's top tokens: tokens outside KVCOMM's top list get its smallest listed log-probability,
so the KL is a lower bound). A cache_salt set by the client makes the server serve a chat
request plainly, which is how the plain twins stay plain. Results: results/chat/<name>.json
(framework, token_reuse, plain_token_reuse, lost_requests, errored_requests, per-agent TTFT,
first-token agreement and KL with bootstrap intervals over conversations).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import uuid

from kvcomm_app import provenance
from kvcomm_app.runtime.fidelity import bootstrap_interval

TOP = 20
PLAIN_SALT = "kvcomm-bench-plain-baseline"   # the plain twins' own prefix cache


def load_traffic(path: str) -> list[list[dict]]:
    """Requests grouped by conversation, in recorded order, each with the reply recorded for
    it under "_recorded_reply" (removed before sending)."""
    convs: dict = {}
    import gzip
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                reply = ((rec.get("response") or {}).get("text") or "").strip()
                convs.setdefault(rec.get("conversation", 0), []).append(dict(rec["request"], _recorded_reply=reply))
    return [convs[k] for k in sorted(convs)]


def with_live_replies(body: dict, live: dict[str, str]) -> dict:
    """The request as the framework would have sent it to this server: every reply recorded
    earlier in the conversation replaced, wherever a message carries it, by the reply this
    server gave in its place (a framework passes on what it received; a replayed recording
    would otherwise carry replies this server never produced, and no reuse of them is
    possible). A message that is a recorded reply (edge whitespace aside) is replaced whole;
    recorded replies the server's index finds inside longer text (at least its KEY characters)
    also inside longer messages, longest first.
    System messages are the agents' own and stay."""
    if not live:
        return body
    from kvcomm.plan.contents import KEY
    order = sorted((r for r in live if len(r) >= KEY), key=len, reverse=True)
    msgs = []
    for m in body["messages"]:
        c = m.get("content")
        if isinstance(c, str) and c and m.get("role") not in ("system", "developer"):
            if c.strip() in live:
                c = c.replace(c.strip(), live[c.strip()])
            else:
                for old in order:
                    if old in c:
                        c = c.replace(old, live[old])
            m = dict(m, content=c)
        msgs.append(m)
    return dict(body, messages=msgs)


def send(client, body: dict, tenant: str, stream: bool = True) -> dict:
    """One request, greedy with the first token's top log-probabilities: its TTFT (streamed
    only), whole time, text, first token and report."""
    body = dict(body, temperature=0, logprobs=True, top_logprobs=TOP)
    body.pop("n", None)
    if not stream:
        return _send_whole(client, dict(body, stream=False), tenant)
    body = dict(body, stream=True, stream_options={"include_usage": True})
    ttft, text, first, report, usage, last = None, [], None, None, {}, 0.0
    for t, chunk in client.stream("/v1/chat/completions", body, headers={"Authorization": f"Bearer {tenant}"}):
        last = t
        report = ((chunk.get("kv_transfer_params") or {}).get("kvcomm")) or report
        usage = chunk.get("usage") or usage
        for ch in chunk.get("choices") or []:
            delta = (ch.get("delta") or {}).get("content") or ""
            if ttft is None and (delta or ch.get("logprobs")):
                ttft = t * 1000.0
            text.append(delta)
            if first is None:
                first = _first_token(ch)
    return _outcome(ttft, last * 1000.0, "".join(text), first, report, ttft is not None, usage)


def _send_whole(client, body: dict, tenant: str) -> dict:
    """A non-streamed request: no TTFT, the whole call's time."""
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions", body, headers={"Authorization": f"Bearer {tenant}"})
    total = (time.perf_counter() - t0) * 1000.0
    choice = (r.get("choices") or [{}])[0]
    first = _first_token(choice)
    return _outcome(None, total, (choice.get("message") or {}).get("content") or "", first,
                    (r.get("kv_transfer_params") or {}).get("kvcomm"), first is not None, r.get("usage") or {})


def _first_token(choice: dict) -> dict | None:
    """The first token's top log-probabilities in a choice (a stream chunk's or a whole
    response's), None when it lists none."""
    lp = (choice.get("logprobs") or {}).get("content") or []
    return {e["token"]: e["logprob"] for e in lp[0].get("top_logprobs") or []} if lp else None


def _outcome(ttft, total_ms, text, first, report, generated, usage) -> dict:
    return {"ttft_ms": ttft, "total_ms": total_ms, "text": text, "first": first or {}, "report": report,
            "generated": generated, "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def first_token_kl(p: dict, q: dict) -> float | None:
    """KL(p || q) over p's listed tokens (log-probabilities), q's floor for tokens q does not list."""
    if not p or not q:
        return None
    floor = min(q.values())
    return sum(math.exp(lp) * (lp - q.get(tok, floor)) for tok, lp in p.items())


def own_prefix_tokens(tok, messages: list[dict]) -> int:
    """Tokens of the agent's own prefix: the chat template applied to its system messages."""
    system = [m for m in messages if m.get("role") in ("system", "developer")]
    if not system:
        return 0
    text = tok.apply_chat_template(system, tokenize=False, add_generation_prompt=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def reuse_share(calls: list[dict]) -> float | None:
    after = sum(c["after_own_prefix"] for c in calls)
    return sum(c["reused_after_own_prefix"] for c in calls) / after if after else None


def plain_reuse_share(calls: list[dict]) -> float | None:
    """The same share for the plain twins: what vLLM's prefix cache alone reused."""
    after = sum(c["after_own_prefix"] for c in calls)
    return sum(c.get("plain_reused_after_own_prefix", 0) for c in calls) / after if after else None


def agreement(calls: list[dict]) -> float | None:
    pairs = [c for c in calls if c["first_equal"] is not None]
    return sum(c["first_equal"] for c in pairs) / len(pairs) if pairs else None


def mean_kl(calls: list[dict]) -> float | None:
    kls = [c["kl"] for c in calls if c["kl"] is not None]
    return statistics.fmean(kls) if kls else None


BUSY_SERIES = ("kvcomm_internal_requests", "vllm:num_requests_running", "vllm:num_requests_waiting")


def server_busy(metrics: str) -> bool:
    """Whether a server's /metrics text shows requests or KVCOMM's own background work
    (template passes, encodings) in flight."""
    for line in metrics.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in BUSY_SERIES and float(line.rsplit(" ", 1)[1]) > 0:
            return True
    return False


def wait_idle(read_metrics, timeout_s: float = 120.0, settle: int = 3, interval_s: float = 0.1) -> float:
    """Seconds until `read_metrics()` (the server's /metrics text) showed an idle server
    `settle` times in a row; timeout_s at most."""
    t0, quiet = time.perf_counter(), 0
    while quiet < settle and time.perf_counter() - t0 < timeout_s:
        quiet = 0 if server_busy(read_metrics()) else quiet + 1
        time.sleep(interval_s)
    return time.perf_counter() - t0


def metrics_reader(client):
    import urllib.request

    def read() -> str:
        with urllib.request.urlopen(f"http://{client.host}:{client.port}/metrics", timeout=60) as r:
            return r.read().decode()
    return read


def run(client, tok, convs: list[list[dict]], log, live_replies: bool = True,
        read_metrics=None, as_sent: bool = False) -> tuple[list[list[dict]], int, int]:
    """Each conversation twice: its calls back to back as the framework sent them (KVCOMM),
    then - once the server is idle - the same bodies back to back as plain vLLM. Each mode's
    calls then overlap only that mode's own work: KVCOMM's encodings and template passes run
    beside the KVCOMM calls after them, as they do for a framework, and never beside a plain
    call. as_sent: each request streamed or not as the framework sent it (a non-streamed call
    has no TTFT, only its whole time); otherwise all are streamed."""
    out, lost, errored = [], 0, 0
    read_metrics = read_metrics or metrics_reader(client)
    for ci, conv in enumerate(convs):
        kv_done, live = [], {}
        for recorded in conv:
            body = {k: v for k, v in recorded.items() if k != "_recorded_reply"}
            if live_replies:
                body = with_live_replies(body, live)
            stream = bool(body.get("stream")) or not as_sent   # the plain twin is sent alike
            try:
                kv = send(client, body, "kvcomm", stream)
            except Exception as e:
                errored += 1
                log(f"conversation {ci}: request failed: {e!r}")
                continue
            was = recorded.get("_recorded_reply") or ""
            if was and kv["text"].strip() and kv["text"].strip() != was:
                live[was] = kv["text"].strip()
            kv_done.append((body, was, kv, stream))
        idle_s = wait_idle(read_metrics)
        calls = []
        for body, was, kv, stream in kv_done:
            try:
                plain = send(client, dict(body, cache_salt=PLAIN_SALT), f"plain-{uuid.uuid4().hex}", stream)
            except Exception as e:
                errored += 1
                log(f"conversation {ci}: request failed: {e!r}")
                continue
            if not kv["generated"] or not plain["generated"]:   # no token came back
                lost += 1
                continue
            calls.append(paired_call(tok, ci, body, was, kv, plain))
        out.append(calls)
        log(f"conversation {ci}: {len(calls)} calls, paths {[c['path'] for c in calls]}; "
            f"idle {idle_s:.1f} s after the KVCOMM calls")
    return out, lost, errored


def paired_call(tok, ci: int, body: dict, was: str, kv: dict, plain: dict) -> dict:
    """One call's record from its two responses."""
    agent = next((m.get("content", "")[:40] for m in body["messages"] if m.get("role") == "system"), "")
    T = kv["prompt_tokens"] or plain["prompt_tokens"] or 0
    own = own_prefix_tokens(tok, body["messages"])
    rep = kv["report"] or {}
    # a plainly served KVCOMM-tenant call reuses what vLLM's prefix cache gave it
    reused = max(0, int(rep.get("reused_tokens") or kv["cached_tokens"] or 0) - own)
    plain_reused = max(0, int(plain["cached_tokens"] or 0) - own)
    p_top = max(plain["first"], key=plain["first"].get) if plain["first"] else None
    k_top = max(kv["first"], key=kv["first"].get) if kv["first"] else None
    return {"conversation": ci, "agent": agent, "path": rep.get("path", "plain"),
            "reason": rep.get("reason", "nothing known: plain vLLM"), "prompt_tokens": T,
            "after_own_prefix": max(0, T - own), "reused_after_own_prefix": reused,
            "cached_tokens": rep.get("cached_tokens", kv["cached_tokens"]),
            "plain_reused_after_own_prefix": plain_reused,
            "ttft_plain_ms": _ms(plain["ttft_ms"]), "ttft_kvcomm_ms": _ms(kv["ttft_ms"]),
            "total_plain_ms": round(plain["total_ms"], 1), "total_kvcomm_ms": round(kv["total_ms"], 1),
            "reply_as_recorded": kv["text"].strip() == was if was else None,
            "first_equal": None if p_top is None or k_top is None else p_top == k_top,
            "kl": first_token_kl(plain["first"], kv["first"])}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def summarize(by_conv: list[list[dict]], warmup: int) -> dict:
    measured = by_conv[warmup:]
    calls = [c for conv in measured for c in conv]
    reused = [c for c in calls if c["path"] != "plain"]
    agents: dict = {}
    for c in calls:
        agents.setdefault(c["agent"], []).append(c)
    per_agent = {a: ttft_table(cs) for a, cs in agents.items()}
    # an agent's first turn in a conversation is where text other agents carry is new to it; in
    # its later turns its own earlier prompt is a prefix, which plain vLLM's prefix cache reuses too
    per_turn: dict = {}
    for conv in measured:
        seen: dict = {}
        for c in conv:
            turn = "first" if c["agent"] not in seen else "later"
            seen[c["agent"]] = True
            per_turn.setdefault(c["agent"], {}).setdefault(turn, []).append(c)
    return {"measured_conversations": len(measured), "calls": len(calls),
            "token_reuse": reuse_share(calls), "token_reuse_ci95": bootstrap_interval(measured, reuse_share),
            "plain_token_reuse": plain_reuse_share(calls),
            "plain_token_reuse_ci95": bootstrap_interval(measured, plain_reuse_share),
            "first_token_agreement": agreement(reused), "first_token_agreement_ci95": bootstrap_interval(
                [[c for c in conv if c["path"] != "plain"] for conv in measured], agreement),
            "first_token_kl_mean": mean_kl(reused), "first_token_kl_ci95": bootstrap_interval(
                [[c for c in conv if c["path"] != "plain"] for conv in measured], mean_kl),
            "paired_calls_through_kvcomm": len(reused), "per_agent": per_agent,
            "per_agent_turn": {a: {t: ttft_table(cs) for t, cs in turns.items()} for a, turns in per_turn.items()},
            "conversation_seconds": conversation_seconds(measured),
            "token_reuse_by_conversations": learning_curve(by_conv, max(warmup, 1)),
            "replies_as_recorded": _share([c.get("reply_as_recorded") for c in calls])}


def ttft_table(calls: list[dict]) -> dict:
    """Median TTFT (of the streamed calls) and whole call time of both modes, their ratios, the
    paths and the token reuse of some calls."""
    paths: dict = {}
    for c in calls:
        paths[c["path"]] = paths.get(c["path"], 0) + 1
    out = {"calls": len(calls)}
    timed = [c for c in calls if c["ttft_plain_ms"] is not None and c["ttft_kvcomm_ms"] is not None]
    if timed:
        p = statistics.median(c["ttft_plain_ms"] for c in timed)
        k = statistics.median(c["ttft_kvcomm_ms"] for c in timed)
        out.update(plain_ms_median=p, kvcomm_ms_median=k, speedup=p / k)
    whole = [c for c in calls if c.get("total_plain_ms") is not None and c.get("total_kvcomm_ms") is not None]
    if whole:
        p = statistics.median(c["total_plain_ms"] for c in whole)
        k = statistics.median(c["total_kvcomm_ms"] for c in whole)
        out.update(plain_total_ms_median=p, kvcomm_total_ms_median=k, total_speedup=p / k if k else None)
    return dict(out, paths=paths, token_reuse=reuse_share(calls), plain_token_reuse=plain_reuse_share(calls))


def conversation_seconds(convs: list[list[dict]]) -> dict:
    """Wall time of the measured conversations' calls, first request byte to last response byte,
    summed per mode (each mode's calls ran back to back): what KVCOMM's work off the calls'
    first tokens - encodings beside a decode, longer decodes - costs shows here, not in TTFT."""
    plain = sum(c.get("total_plain_ms", 0.0) for conv in convs for c in conv) / 1000.0
    kv = sum(c.get("total_kvcomm_ms", 0.0) for conv in convs for c in conv) / 1000.0
    return {"plain": round(plain, 1), "kvcomm": round(kv, 1), "ratio": plain / kv if kv else None}


def learning_curve(by_conv: list[list[dict]], window: int) -> list[dict]:
    """Token reuse of both modes per run of `window` conversations, warm-up included: how far the
    pool had learned the traffic's slots by then (anchors accumulate conversation by conversation)."""
    out = []
    for start in range(0, len(by_conv), window):
        chunk = by_conv[start:start + window]
        calls = [c for conv in chunk for c in conv]
        out.append({"conversations": [start, start + len(chunk) - 1],
                    "token_reuse": reuse_share(calls), "plain_token_reuse": plain_reuse_share(calls)})
    return out


def _share(flags: list) -> float | None:
    known = [f for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traffic", required=True, help="recorded requests (JSON lines)")
    p.add_argument("--name", default=None, help="the framework's name (default: the traffic file's)")
    p.add_argument("--server", default=None, help="a running kvcomm serve (http://host:port); default: start one")
    p.add_argument("--warmup", type=int, default=2, help="conversations before the measured ones")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--recompute", default=None,
                   help="the server's recompute policy ('none' or 'tail=N': the last N prompt tokens of every "
                        "KVCOMM call computed); default: the server's")
    p.add_argument("--chat-tail", type=int, default=None, metavar="N",
                   help="the last N prompt tokens of an inferred chat call computed (kvcomm serve --chat-tail); "
                        "default: the server's (96)")
    p.add_argument("--out", default=None, help="default results/chat/<name>.json")
    p.add_argument("--log", default="/tmp/kvcomm-chat-bench.log")
    p.add_argument("--as-sent", action="store_true",
                   help="send each request streamed or not as the framework sent it (AutoGen does not stream: "
                        "its calls are timed whole, with no TTFT); by default every request is streamed")
    p.add_argument("--recorded-replies", action="store_true",
                   help="send the requests as recorded; by default a reply this server gave differently "
                        "replaces the recorded one in the conversation's later requests (both twins)")
    args = p.parse_args(argv)
    if args.server and (args.recompute or args.chat_tail):
        p.error("--recompute and --chat-tail configure the server this benchmark starts; with --server set "
                "them on that server (kvcomm serve --recompute / --chat-tail)")
    name = args.name or os.path.splitext(os.path.basename(args.traffic))[0]
    out_path = args.out or f"results/chat/{name}.json"
    made = provenance.capture("python", "benchmarks/chat_paired.py", argv=argv)
    from transformers import AutoTokenizer

    from kvcomm.models import embedded_model_dir
    from kvcomm.vllm.chat_front import DEFAULT_TAIL
    from kvcomm.vllm.client import KVCommClient
    from kvcomm.vllm.launch import Server
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)
    model = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(model)
    convs = load_traffic(args.traffic)
    server = None
    if args.server:
        client = KVCommClient(args.server)
    else:
        # requests with tools need a tool call parser (docs/chat-frameworks.md)
        tools = any(body.get("tools") for conv in convs for body in conv)
        server = Server(model, args.log, served_model_name="SmolLM2-135M-Instruct", dtype=args.dtype,
                        max_model_len=4096, kv_cache_bytes=2 << 30,
                        **({"plan": {"recompute": args.recompute}} if args.recompute else {}),
                        **({"chat": {"tail": args.chat_tail}} if args.chat_tail else {}),
                        extra_args=["--enable-prompt-tokens-details"]   # the plain twins' cache hits
                        + (["--enable-auto-tool-choice", "--tool-call-parser", "pythonic"] if tools else []))
        client = server.__enter__()
    try:
        by_conv, lost, errored = run(client, tok, convs, log, live_replies=not args.recorded_replies,
                                     as_sent=args.as_sent)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    doc = {"framework": name, "traffic": args.traffic, "dtype": args.dtype, "warmup_conversations": args.warmup,
           "recompute": args.recompute or "the server's default",
           "chat_tail": "the server's" if args.server else args.chat_tail or DEFAULT_TAIL,
           "replies": "as recorded" if args.recorded_replies else "this server's, in later requests",
           "streaming": "as the framework sent them" if args.as_sent else "every request streamed",
           **summarize(by_conv, args.warmup), "lost_requests": lost, "errored_requests": errored,
           "device_detail": provenance.device_detail("cpu", args.dtype), "load_average": provenance.load_average(),
           "wall_s": round(time.perf_counter() - t0, 1), **made.fields(), "conversations": by_conv}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
    log(f"token reuse {doc['token_reuse']}, first-token agreement {doc['first_token_agreement']}, KL "
        f"{doc['first_token_kl_mean']}; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
