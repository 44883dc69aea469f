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


def synthetic_worker(seed: int, anchors: int, length: int, agents=lambda j: ("x",), **settings):
    """A WorkerState over a synthetic pool (2 layers, 2 KV heads, head_dim 8): `anchors`
    anchors of `length` tokens in user_question near the content (k, v) of 6 tokens, each
    with deltas of the agents `agents(j)`. Returns (ws, pool, k, v, generator)."""
    from types import SimpleNamespace

    from kvcomm import PoolConfig
    from kvcomm.plan import PlanSettings

    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    pool = AnchorPool(PoolConfig(min_anchors=2, gamma=8.0))
    for j in range(anchors):
        aid = pool.add_anchor("user_question", k[:, :, :length] + 0.1 * j, v[:, :, :length] + 0.1 * j)
        for agent in agents(j):
            pool.record_deltas("user_question", aid, agent,
                               *(torch.randn(2, 2, length, 8, generator=g) for _ in range(2)))
    spec = SimpleNamespace(inv_freq=1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), exact_positions=None,
                           rope_type="default", dtype=torch.float32, device=torch.device("cpu"))
    return WorkerState(spec, pool, RankGroup(1), settings=PlanSettings(**settings)), pool, k, v, g


def prepared(ws, k, v):
    """What the worker prepares for a 6-token user_question content (k, v) once its encoding lands."""
    ids = tuple(range(6))
    st = ws.session("s")
    st.encoded[("question", ids)] = (k, v)
    ws._prepare_weights(st, "user_question", ("question", ids))
    return st.prepared[("user_question", ids)]


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
    paths, took_ahead, windows = [], 0, 0
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
                taken = {w.token_k.data_ptr() for (n, _), w in c.weights.items() if n == len(ids)}
                if prep is not None and any(w.token_k.data_ptr() in taken for w in prep.weights):
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
                # the KV the call computed, read back from where the record starts (a partial
                # call's computed end only) -> the same deltas as the engine recorded
                start = ws.record_start(f"r{j}{name}")
                assert start is not None and (start >= res.prefix if res.path == "partial" else start <= lay.spans[0][1])
                windows += start > 0   # S0 (at least) not read back
                assert ws.record(f"r{j}{name}", cache.k[:, :, start:T - 1].clone(), cache.v[:, :, start:T - 1].clone(),
                                 start)
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
    assert took_ahead > 0 and windows > 0


def test_weights_are_prepared_for_each_set_of_anchors_the_agents_use():
    """Agents holding deltas of different anchors (they read the slot in different graphs)
    estimate over different sets: the server prepares weights for each set, and each agent's
    first estimate takes those over its own set."""
    from kvcomm.plan.decide import nearest_first, usable_anchors

    ws, pool, k, v, _ = synthetic_worker(5, 6, 6, agents=lambda j: ("x", "y") if j % 2 else ("x",),
                                         estimate_anchors=2)
    spec = ws.spec
    prep = prepared(ws, k, v)
    cand, dist = pool.candidate_distances("user_question", v, rms=False)
    near = nearest_first(cand, dist)
    sets = {agent: usable_anchors(pool.anchors("user_question"), 6, agent, near, 2) for agent in ("x", "y")}
    assert sets["x"] != sets["y"]
    by_set = {tuple(w.anchors): w for w in prep.weights}
    assert set(by_set) == set(sets.values())
    for agent, used in sets.items():   # each agent's estimate takes the weights over its own set
        w = by_set[used]
        res = pool.estimate("user_question", agent, k, v, spec.inv_freq, 0, torch.empty_like(k), torch.empty_like(v),
                            nearest=list(near), limit=2, weights=w)
        assert tuple(res.anchors) == used and res.weights.token_k.data_ptr() == w.token_k.data_ptr()
        fresh = pool.estimate("user_question", agent, k, v, spec.inv_freq, 0, torch.empty_like(k),
                              torch.empty_like(v), nearest=list(near), limit=2)
        torch.testing.assert_close(res.weights.token_k, fresh.weights.token_k, rtol=0, atol=0)


def test_a_content_longer_than_the_pool_covers_is_prepared_on_its_head(monkeypatch):
    """A report a few tokens longer than its slot's anchors is decided on its covered head
    (kvcomm.plan.decide.decide_content): the server prepares that head's distances and
    weights, and the first estimate of the head takes them."""
    from kvcomm.plan.decide import HeadShare

    monkeypatch.setattr(HeadShare, "take", lambda self, slot, ids, covered=None: True)
    ws, pool, k, v, _ = synthetic_worker(6, 3, 5)
    spec = ws.spec
    prep = prepared(ws, k, v)
    assert prep.head is not None and prep.head[0] == 5 and len(prep.weights) == 1
    (w,) = prep.weights
    assert tuple(w.token_k.shape) == (3, 5)   # weights over the head's 5 tokens
    res = pool.estimate("user_question", "x", k[:, :, :5], v[:, :, :5], spec.inv_freq, 0,
                        torch.empty(2, 2, 5, 8), torch.empty(2, 2, 5, 8), weights=w)
    assert res.weights.token_k.data_ptr() == w.token_k.data_ptr()


def test_a_call_waits_for_its_contents_preparation_in_flight(monkeypatch):
    """The preparation starts when the encoding lands, on a thread of its own; a call (or the
    first carrier's settle) that decides the content meanwhile waits for it instead of doing
    the same passes over the anchors beside it."""
    import threading

    ws, pool, k, v, _ = synthetic_worker(7, 3, 6)
    release = threading.Event()
    slow = ws._prepare_weights
    monkeypatch.setattr(ws, "_prepare_weights", lambda *a: (release.wait(5), slow(*a)))
    ids = tuple(range(6))
    ws.add_encoding("s", "question", ids, k, v, 0, slot="user_question")
    st = ws.session("s")
    assert ("user_question", ids) not in st.prepared and len(ws._preparing) == 1
    threading.Timer(0.2, release.set).start()
    ws._await_preparing(st, [("user_question", ids)])
    assert ("user_question", ids) in st.prepared and st.prepared[("user_question", ids)].weights
    ws.flush()
    assert not ws._preparing
