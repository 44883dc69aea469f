"""`kvcomm serve` as a service (fp32, SmolLM2-135M, a server in a child process):
- the pool is saved when the server is stopped (SIGTERM) and a new server loaded from that
  file reuses on the first call that can reuse;
- a streamed response reports the path and reason in a last chunk; /metrics shows KVCOMM's
  counters; the log has one line per call;
- a reply passed on with its trailing newline does not send the reader dense;
- a pool file that cannot be used stops the server before it takes traffic."""
import urllib.request

import pytest

from conftest import KV_BYTES, SMALL_POOL

AGENTS = [
    ("solver", "You are a careful math tutor.",
     "Solve this problem.\nProblem:\n{user_question}\nReply with the final number only."),
    ("checker", "You double-check arithmetic.",
     "Check this problem carefully.\nProblem:\n{user_question}\nGive only the answer."),
    ("judge", "You pick the right answer.",
     "Problem:\n{user_question}\nFirst answer:\n{agent_solver_current}\nSecond answer:\n"
     "{agent_checker_current}\n\nWhich answer is right? Reply with the number."),
]
WARM = ["What is 12 plus 7?", "A farmer has 3 cows and buys 5 more. How many cows does he have?",
        "Tom has 20 apples and eats 4. How many apples are left?", "A box holds 6 eggs. How many eggs are in 4 boxes?"]
ARGS = ["--enforce-eager", "--block-size", "32", "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(KV_BYTES)]


def start(model_dir, log_path, **kw):
    from kvcomm.vllm.launch import Server
    return Server(model_dir, str(log_path), served_model_name="smol", dtype="float32", max_model_len=1024,
                  pool=SMALL_POOL, extra_args=ARGS, **kw)


def graph(client, question, *, learn=True, stream=False, trailing=""):
    eng = client.engine(learn=learn, stream=stream)
    for a in AGENTS:
        eng.add_agent(*a)
    eng.new_request()
    a = eng.call("solver", {"user_question": question}, max_new_tokens=8)
    b = eng.call("checker", {"user_question": question}, max_new_tokens=8)
    c = eng.call("judge", {"user_question": question, "agent_solver_current": (a.text.strip() or "none") + trailing,
                           "agent_checker_current": (b.text.strip() or "none") + trailing}, max_new_tokens=4)
    return [a, b, c]


def test_pool_survives_a_restart_and_the_server_is_observable(model_dir, tmp_path):
    pool_file = tmp_path / "pool.bin"
    with start(model_dir, tmp_path / "first.log", pool_file=str(pool_file), pool_new=True) as client:
        for q in WARM:
            graph(client, q)
        calls = graph(client, "What is 9 times 8?", stream=True, trailing="\n")
        # streamed calls get the server's report in a last chunk
        assert all(c.path in ("reuse", "partial", "dense") and c.reason for c in calls), \
            [(c.path, c.reason) for c in calls]
        assert "boundary token merge" not in calls[2].reason           # the trailing newlines joined the segment
        with urllib.request.urlopen(f"http://{client.host}:{client.port}/metrics", timeout=60) as r:
            metrics = r.read().decode()
        for name in ("kvcomm_calls_total", "kvcomm_reused_tokens_total", "kvcomm_pool_anchors",
                     "kvcomm_slot_decisions_total", "kvcomm_internal_requests"):
            assert name in metrics, name
    # SIGTERM stopped the server; its pool is on disk
    import kvcomm
    saved = kvcomm.AnchorPool(kvcomm.PoolConfig())
    saved.load(str(pool_file))
    assert saved.size() >= 4
    log = (tmp_path / "first.log").read_text()
    assert log.count("kvcomm call ") >= 3 * (len(WARM) + 1)               # one line per call
    assert "saved the anchor pool" in log
    with start(model_dir, tmp_path / "second.log", pool_file=str(pool_file)) as client:
        calls = graph(client, "What is 100 minus 37?", learn=False)
        # the solver carries the question first (computed in context); the checker, the first
        # call that can reuse, reuses from the loaded pool
        assert calls[1].path == "reuse", [(c.agent, c.path, c.reason) for c in calls]
    assert "loaded anchor pool" in (tmp_path / "second.log").read_text()


@pytest.mark.parametrize("content", [None, b"not a pool file"], ids=["missing", "corrupt"])
def test_an_unusable_pool_file_stops_the_server_before_traffic(model_dir, tmp_path, content):
    pool_file = tmp_path / "pool.bin"
    if content is not None:
        pool_file.write_bytes(content)
    with pytest.raises(RuntimeError, match="did not start: RuntimeError: kvcomm: ") as e:
        with start(model_dir, tmp_path / "server.log", pool_file=str(pool_file), timeout=600):
            pass
    first_line = str(e.value).splitlines()[0]
    assert ("does not exist" if content is None else "cannot use the anchor pool file") in first_line
