"""vLLM with the connector, engine in this process (fp32, SmolLM2-135M):
- requests the connector does not estimate (plain ones, and KVCOMM calls on the dense
  path) give vLLM's own tokens, as vLLM without the connector gives them;
- the KV the reuse path writes into vLLM's blocks equals the KV KVCommEngine assembles for
  the same prompt and pool, and the first token is the same;
- a load that fails is recomputed by vLLM: the call still gets exact tokens."""
import pytest

from conftest import CRITIC, SOLVER, TEST, WARM, run_reference

MAX = 8


@pytest.fixture(scope="module")
def warm_run(offline):
    """Solver then critic over the warm-up questions (learning, cold pool first), plus the
    same prompts as plain requests through the same engine."""
    calls = []
    for i, q in enumerate(WARM[:4]):
        a = offline.call("solver", {"user_question": q}, session=f"w{i}", max_tokens=MAX)
        b = offline.call("critic", {"user_question": q, "agent_solver_current": a.text.strip() or "none"},
                         session=f"w{i}", max_tokens=MAX)
        calls += [a, b]
    plain = [offline.call(*args, session="plain", max_tokens=MAX, kvcomm=False) for args in
             [("solver", {"user_question": q}) for q in WARM[:2]]]
    return calls, plain


def test_dense_and_plain_requests_equal_vllm_without_connector(warm_run, model_dir):
    calls, plain = warm_run
    dense = [c for c in calls if c.path == "dense"]
    assert len(dense) >= 4, [c.path for c in calls]     # a cold pool: the first calls are anchors
    assert {c.path for c in calls} == {"dense", "reuse"}
    prompts = [c.prompt_ids for c in dense + plain]
    ref = run_reference(model_dir, prompts, MAX)
    assert [c.token_ids for c in dense + plain] == ref


def test_reuse_path_kv_equals_hf_engine(offline, connector, warm_run, smollm2):
    from kvcomm.vllm.verify import reuse_vs_hf
    model, tok = smollm2
    cmp = reuse_vs_hf(offline, connector, model, tok, [SOLVER, CRITIC], TEST + WARM[4:5], max_tokens=(12, 4))
    pairs = cmp.reuse_pairs
    print("reuse-path comparisons:", [(c["agent"], c["k_max_abs_diff"], c["v_max_abs_diff"]) for c in pairs])
    assert len(pairs) >= 2, cmp.calls
    assert cmp.kv_max_abs_diff <= 1e-4
    assert cmp.first_token_equal == 1.0, [(c["vllm_first"], c["hf_first"]) for c in pairs]
    # both engines took the same path on every call
    assert all(c["vllm_path"].split(" ")[0] == c["hf_path"] for c in cmp.calls), cmp.calls


def test_failed_load_is_recomputed(offline, connector, warm_run, monkeypatch):
    ws = connector.worker_state
    plan = ws.plan
    lost = []

    def plan_then_lose(req_id, ids, call):   # the staged KV disappears before the load step
        res = plan(req_id, ids, call)
        if ws.staged.pop(req_id, None) is not None:
            lost.append(req_id)
        return res
    monkeypatch.setattr(ws, "plan", plan_then_lose)
    reported = []
    errors = connector.get_block_ids_with_load_errors

    def spy():
        out = errors()
        reported.extend(out)
        return out
    monkeypatch.setattr(connector, "get_block_ids_with_load_errors", spy)
    q = TEST[1]
    got = offline.call("solver", {"user_question": q}, session="lost", max_tokens=MAX, learn=False)
    assert got.path == "reuse" and lost, (got.path, got.reason)   # planned as reuse, KV lost
    assert reported                                              # the blocks were reported
    monkeypatch.undo()
    plain = offline.call("solver", {"user_question": q}, session="plain", max_tokens=MAX, kvcomm=False)
    assert got.token_ids == plain.token_ids                       # vLLM recomputed them exactly
