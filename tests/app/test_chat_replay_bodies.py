"""What the chat benchmark sends (kvcomm_app.bench.chat_paired): a recorded conversation
carries the replies this server gave, not the recorded ones, in its later requests."""
import json
import time

from kvcomm_app.bench.chat_paired import load_traffic, with_live_replies

LONG_OLD = "The library moved to the river bank in 1967, as the passage says."
LONG_NEW = "It moved in 1967."


def body(*messages):
    return {"model": "m", "messages": [{"role": "system", "content": "You check. The answer is: 2"}, *messages]}


def test_a_reply_given_differently_replaces_the_recorded_one_wherever_it_is_carried():
    live = {LONG_OLD: LONG_NEW, "The answer is: 2": "The answer is: 3"}
    got = with_live_replies(body({"role": "user", "content": "Task"},
                                 {"role": "assistant", "content": f"{LONG_OLD}\n"},
                                 {"role": "user", "content": f"solver said: {LONG_OLD} Check it."},
                                 {"role": "user", "content": " The answer is: 2"},
                                 {"role": "user", "content": "Is The answer is: 2 right?"}), live)
    contents = [m["content"] for m in got["messages"]]
    assert contents == ["You check. The answer is: 2",        # the agent's own system text stays
                        "Task", f"{LONG_NEW}\n", f"solver said: {LONG_NEW} Check it.",
                        " The answer is: 3",                   # a short reply: as a whole message
                        "Is The answer is: 2 right?"]          # ...and never inside a longer one
    assert with_live_replies(body({"role": "user", "content": "Task"}), {}) == body({"role": "user", "content": "Task"})


def test_the_traffic_keeps_each_requests_recorded_reply(tmp_path):
    path = tmp_path / "t.jsonl"
    recs = [{"conversation": 1, "request": body({"role": "user", "content": "B"}), "response": {"text": " b "}},
            {"conversation": 0, "request": body({"role": "user", "content": "A"}), "response": {"text": "a"}},
            {"conversation": 0, "request": body({"role": "user", "content": "A2"}), "response": {}}]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    convs = load_traffic(str(path))
    assert [[b["messages"][-1]["content"] for b in c] for c in convs] == [["A", "A2"], ["B"]]
    assert [[b["_recorded_reply"] for b in c] for c in convs] == [["a", ""], ["b"]]


def test_learning_curve_reports_reuse_per_run_of_conversations():
    from kvcomm_app.bench.chat_paired import learning_curve
    call = lambda reused, plain: {"after_own_prefix": 100, "reused_after_own_prefix": reused,   # noqa: E731
                                  "plain_reused_after_own_prefix": plain}
    convs = [[call(0, 0), call(20, 10)], [call(40, 10)], [call(90, 10), call(70, 30)], [call(100, 0)], [call(80, 0)]]
    curve = learning_curve(convs, 2)
    assert [w["conversations"] for w in curve] == [[0, 1], [2, 3], [4, 4]]   # the last run is shorter
    assert [w["token_reuse"] for w in curve] == [60 / 300, 260 / 300, 80 / 100]
    assert [w["plain_token_reuse"] for w in curve] == [20 / 300, 40 / 300, 0 / 100]


def test_summary_splits_each_agents_first_turn_from_its_later_turns():
    from kvcomm_app.bench.chat_paired import summarize
    def call(agent, plain_ms, kv_ms, path="reuse"):
        return {"agent": agent, "path": path, "ttft_plain_ms": plain_ms, "ttft_kvcomm_ms": kv_ms,
                "after_own_prefix": 100, "reused_after_own_prefix": 50, "plain_reused_after_own_prefix": 10,
                "first_equal": True, "kl": 0.0}
    warm = [call("solver", 1, 1, "plain")]
    conv = lambda k: [call("solver", 500, 500, "plain"), call("critic", 400 + k, 100),   # noqa: E731
                      call("solver", 60, 60, "dense"), call("critic", 80, 40 + k)]
    s = summarize([warm, conv(0), conv(10), conv(20)], warmup=1)
    critic = s["per_agent_turn"]["critic"]
    assert critic["first"]["calls"] == critic["later"]["calls"] == 3
    assert (critic["first"]["plain_ms_median"], critic["first"]["kvcomm_ms_median"]) == (410, 100)
    assert (critic["later"]["plain_ms_median"], critic["later"]["kvcomm_ms_median"]) == (80, 50)
    assert s["per_agent_turn"]["solver"]["later"]["paths"] == {"dense": 3}
    # the per-agent table still pools both turns
    assert s["per_agent"]["critic"]["calls"] == 6


def test_server_busy_reads_requests_and_background_work_from_metrics():
    from kvcomm_app.bench.chat_paired import server_busy
    idle = ('# HELP kvcomm_internal_requests x\nkvcomm_internal_requests 0.0\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\nkvcomm_calls_total{path="reuse"} 7.0\n')
    assert not server_busy(idle)
    assert server_busy(idle.replace("kvcomm_internal_requests 0.0", "kvcomm_internal_requests 1.0"))
    assert server_busy(idle.replace('model_name="m"} 0.0\nvllm:num_requests_waiting', 'model_name="m"} 2.0\n'
                                    'vllm:num_requests_waiting'))


class _CharTokenizer:
    """A tokenizer of one token per character, with a chat template that joins the contents."""

    def apply_chat_template(self, msgs, **kw):
        return "".join(m["content"] for m in msgs)

    def __call__(self, text, **kw):
        return {"input_ids": list(text)}


def test_each_conversation_runs_its_kvcomm_calls_then_waits_for_an_idle_server_then_its_plain_twins():
    from kvcomm_app.bench import chat_paired

    events = []

    class Client:
        def stream(self, path, body, headers):
            mode = "plain" if body.get("cache_salt") else "kvcomm"
            events.append((mode, body["messages"][-1]["content"]))
            yield 0.05, {"choices": [{"delta": {"content": "ok"},
                                      "logprobs": {"content": [{"top_logprobs": [{"token": "ok", "logprob": 0.0}]}]}}]}
            yield 0.06, {"usage": {"prompt_tokens": 10}, "choices": []}

    busy = iter([True, True, False, False, False] * 10)

    def read_metrics():
        events.append(("metrics", None))
        return "kvcomm_internal_requests 1.0" if next(busy) else "kvcomm_internal_requests 0.0"

    conv = lambda *texts: [{"messages": [{"role": "system", "content": "s"},    # noqa: E731
                                         {"role": "user", "content": t}], "_recorded_reply": ""} for t in texts]
    out, lost, errored = chat_paired.run(Client(), _CharTokenizer(), [conv("a", "b"), conv("c")], lambda m: None,
                                         read_metrics=read_metrics)
    assert (lost, errored) == (0, 0) and [len(c) for c in out] == [2, 1]
    sends = [e for e in events if e[0] != "metrics"]
    assert sends == [("kvcomm", "a"), ("kvcomm", "b"), ("plain", "a"), ("plain", "b"), ("kvcomm", "c"), ("plain", "c")]
    # the plain twins of a conversation start only after 3 idle readings in a row
    first_plain = events.index(("plain", "a"))
    assert [e[0] for e in events[first_plain - 5:first_plain]] == ["metrics"] * 5
    assert out[0][0]["ttft_kvcomm_ms"] == out[0][0]["ttft_plain_ms"] == 50.0


def test_conversation_seconds_sum_each_modes_whole_calls():
    from kvcomm_app.bench.chat_paired import conversation_seconds
    convs = [[{"total_plain_ms": 1500.0, "total_kvcomm_ms": 1000.0}, {"total_plain_ms": 500.0, "total_kvcomm_ms": 1000.0}],
             [{"total_plain_ms": 1000.0, "total_kvcomm_ms": 2000.0}]]
    assert conversation_seconds(convs) == {"plain": 3.0, "kvcomm": 4.0, "ratio": 0.75}


def test_as_sent_keeps_a_non_streamed_request_whole_and_times_it_whole():
    from kvcomm_app.bench import chat_paired

    sent = []

    class Client:
        def post(self, path, body, headers):
            sent.append(("post", body["stream"], bool(body.get("cache_salt"))))
            time.sleep(0.02 if body.get("cache_salt") else 0.01)
            return {"choices": [{"message": {"content": "ok"},
                                 "logprobs": {"content": [{"top_logprobs": [{"token": "ok", "logprob": -0.1}]}]}}],
                    "usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}},
                    "kv_transfer_params": None}

        def stream(self, path, body, headers):
            sent.append(("stream", body["stream"], bool(body.get("cache_salt"))))
            yield 0.05, {"choices": [{"delta": {"content": "ok"}}]}

    conv = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "abc"}],
             "stream": False, "_recorded_reply": ""},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "abd"}],
             "stream": True, "_recorded_reply": ""}]
    idle = lambda: "kvcomm_internal_requests 0.0"   # noqa: E731
    out, lost, errored = chat_paired.run(Client(), _CharTokenizer(), [conv], lambda m: None, read_metrics=idle,
                                         as_sent=True)
    assert (lost, errored) == (0, 0)
    assert sent == [("post", False, False), ("stream", True, False), ("post", False, True), ("stream", True, True)]
    whole, streamed = out[0]
    assert whole["ttft_kvcomm_ms"] is None and whole["ttft_plain_ms"] is None and whole["first_equal"] is True
    assert whole["total_plain_ms"] > whole["total_kvcomm_ms"] > 0 and streamed["ttft_kvcomm_ms"] == 50.0
    table = chat_paired.ttft_table(out[0])
    assert table["plain_ms_median"] == table["kvcomm_ms_median"] == 50.0   # the streamed call only
    assert table["total_speedup"] > 1.0
    # without as_sent every request is streamed
    sent.clear()
    chat_paired.run(Client(), _CharTokenizer(), [conv], lambda m: None, read_metrics=idle)
    assert {s[0] for s in sent} == {"stream"}
