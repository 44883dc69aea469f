"""The connector's worker logic against the Hugging Face engine, without vLLM: given the
same agent state, content bases and pool, WorkerState.plan (the planner as a prefix-only
backend) takes the path KVCommEngine(partial="prefix") takes for the same reasons, stages
exactly the KV the engine assembles for the prefix it loads (bit for bit), and records the
same deltas from the same computed KV."""
import torch

from kvcomm import AnchorPool
from kvcomm.engine import KVCommEngine
from kvcomm.plan import RankGroup
from kvcomm.vllm.jobs import CallLayout
from kvcomm.vllm.worker_state import WorkerState

from conftest import CRITIC, SOLVER, TEST, WARM


def run(eng, agent, inputs, max_new_tokens):
    """(AgentCall, cache, layout) of one kvcomm-mode call."""
    out = eng.call(agent, inputs, max_new_tokens=max_new_tokens, keep_cache=True)
    return out, out.cache, out.layout


def layout_of(eng, name, lay, session, max_tokens):
    return CallLayout(agent_key=eng.agents[name].key, agent_name=name, session=session, round=0, learn=True,
                      spans=list(lay.spans), segments=list(lay.segments), s0=lay.s0, problem=lay.problem,
                      max_tokens=max_tokens)


def test_worker_plans_and_records_like_the_engine(smollm2, tmp_path):
    model, tok = smollm2
    # the connector's planning: estimated KV for a prefix only, the last prompt token computed
    eng = KVCommEngine(model, tok, partial="prefix", recompute="none")
    for a in (SOLVER, CRITIC):
        eng.add_agent(*a)
    for q in WARM[:4]:
        eng.new_request()
        a = eng.call("solver", {"user_question": q}, max_new_tokens=8)
        eng.call("critic", {"user_question": q, "agent_solver_current": a.text.strip() or "none"}, max_new_tokens=2)
    ws = WorkerState(eng.spec, AnchorPool(eng.pool.config), RankGroup(1))
    for st in eng.agents.values():
        ws.agents[st.key] = st
    paths, took_ahead = [], 0
    for j, q in enumerate(TEST):
        sid = f"t{j}"
        before = tmp_path / f"pool-{j}.bin"
        eng.pool.save(str(before))
        ws.pool.load(str(before))
        eng.new_request()
        for name, inputs in (("solver", {"user_question": q}), ("critic", None)):
            if name == "critic":
                inputs = {"user_question": q, "agent_solver_current": solver_text}
                # the engine decided the captured reply after the solver call: same pool state and
                # the same per-request contents for the worker
                mid = tmp_path / f"pool-{j}-mid.bin"
                eng.pool.save(str(mid))
                ws.pool.load(str(mid))
                ws.session(sid).contents.update(eng.request.contents)
                ws.session(sid).current.update(eng.request.current)
            out, cache, lay = run(eng, name, inputs, 4)
            st = ws.session(sid)
            st.encoded.update(eng.request.encoded)   # the same header encodings of the contents
            ahead = {}
            for key in st.encoded:   # as when the question's encoding lands: its distances and weights prepared
                if key[0] == "question" and ("user_question", key[1]) not in st.contents:
                    ws._prepare_weights(st, "user_question", key)
                    ahead = {key[1]: st.prepared.get(("user_question", key[1]))}
            res = ws.plan(f"r{j}{name}", lay.ids, layout_of(eng, name, lay, sid, 4))
            for ids, prep in ahead.items():
                c = st.contents[("user_question", ids)]
                used = c.weights.get(len(ids))
                if prep is not None and prep.weights is not None and used is not None and \
                        used.token_k.data_ptr() == prep.weights.token_k.data_ptr():
                    took_ahead += 1   # the call's estimate took the prepared weights (staged KV checked below)
            assert res.path == out.path, (name, q, res.reason, out.reason)
            assert res.slots == out.slot_decisions
            T = lay.length
            assert res.prefix == T - out.computed_tokens
            if res.path in ("reuse", "partial"):
                p = res.prefix
                k, v = ws.staged.pop(f"r{j}{name}")
                assert torch.equal(k[:, :, :p], cache.k[:, :, :p]) and torch.equal(v[:, :, :p], cache.v[:, :, :p])
            else:
                assert res.prefix == min(eng.agents[name].s0, T - 1)
            if res.record:
                # the KV the call computed -> the same deltas as the engine recorded
                assert ws.record(f"r{j}{name}", cache.k[:, :, :T - 1], cache.v[:, :, :T - 1])
                slot = lay.spans[0][0]
                key = eng.agents[name].key
                for a in eng.pool.anchors(slot):
                    if key in a.agents and ws.pool.has_deltas(slot, a.id, key):
                        e, w = eng.pool.anchor_deltas(slot, a.id, key), ws.pool.anchor_deltas(slot, a.id, key)
                        assert all(torch.equal(e[f], w[f]) for f in ("ph_k", "ph_v"))
            paths.append(res.path)
            if name == "solver":
                solver_text = out.text.strip() or "none"
    assert "dense" in paths and ("reuse" in paths or "partial" in paths), paths
    assert took_ahead > 0
