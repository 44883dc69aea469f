"""The call planner on synthetic KV (no model): which slots are estimated or computed, the
path, the positions the model runs, prefix-only planning, what assemble writes, what
record records, capture, and sessions."""
from types import SimpleNamespace

import pytest
import torch

from kvcomm import AnchorPool, PoolConfig
from kvcomm.plan import PlanSettings, Planner, Reply, Session, Sessions, agent_from_template_kv, parse_template
from kvcomm.plan.template import PromptLayout

L, H, D = 2, 2, 8
ROPE = SimpleNamespace(inv_freq=1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), exact_positions=None,
                       rope_type="default")
SLOTS = ("user_question", "agent_a_current")
# S0 = 4 tokens, {user_question} 5 tokens, segment 2, {agent_a_current} 4 tokens, segment 3, last token.
SPANS = [("user_question", 4, 9), ("agent_a_current", 11, 15)]
SEGMENTS = [(9, 11), (15, 18)]
T = 19


def layout(ids=None):
    ids = list(range(100, 100 + T)) if ids is None else ids
    return PromptLayout(ids=ids, spans=list(SPANS), segments=list(SEGMENTS), s0=4)


def agent():
    torch.manual_seed(1)
    k, v = torch.randn(L, H, T, D), torch.randn(L, H, T, D)
    tpl = parse_template("Q:\n{user_question}\nA:\n{agent_a_current}\nok?")
    return agent_from_template_kv("b", "b@x", "", tpl, layout(), k, v, ROPE.inv_freq)


def content(slot, seed):
    g = torch.Generator().manual_seed(seed)
    n = dict(SPANS_LEN)[slot]
    return torch.randn(L, H, n, D, generator=g), torch.randn(L, H, n, D, generator=g)


SPANS_LEN = [(s, b - a) for s, a, b in SPANS]


def pool_with(covered: set, min_anchors=2, agent_key="b@x", anchors=2):
    """A pool whose slots in `covered` hold `anchors` anchors with this agent's deltas, each
    near its slot's content (so the content shares)."""
    pool = AnchorPool(PoolConfig(min_anchors=min_anchors))
    for i, (slot, a, b) in enumerate(SPANS):
        if slot not in covered:
            continue
        k, v = content(slot, 0)
        seg = SEGMENTS[i][1] - SEGMENTS[i][0]
        for j in range(anchors):
            aid = pool.add_anchor(slot, k + j, v + j)   # the content sits on anchor 0, far from the rest
            pool.record_deltas(slot, aid, agent_key, torch.randn(L, H, b - a, D), torch.randn(L, H, b - a, D),
                               torch.randn(L, H, seg, D), torch.randn(L, H, seg, D))
    return pool


def session_with_bases():
    st = Session(index=1)
    lay = layout()
    for slot, a, b in SPANS:
        kind = "question" if slot == "user_question" else "reply"
        st.encoded[(kind, tuple(lay.ids[a:b]))] = content(slot, 0)
    return st


def plan_of(pool, settings, st=None, **kw):
    planner = Planner(pool, ROPE, settings)
    st = st or session_with_bases()
    return planner, planner.plan(agent(), layout(), st, max_new_tokens=4, **kw), st


def test_every_slot_estimated_is_a_reuse_call_running_the_last_token():
    _, plan, _ = plan_of(pool_with(set(SLOTS)), PlanSettings())
    assert plan.path == "reuse" and plan.reason == "all slots shared"
    assert plan.positions == [T - 1] and plan.prefix == T - 1 and plan.s0 == 4
    assert plan.decisions == {"user_question": "share", "agent_a_current": "share"}


def test_a_partial_call_estimates_the_other_slots_and_computes_the_uncovered_one():
    _, plan, _ = plan_of(pool_with({"agent_a_current"}), PlanSettings())
    assert plan.path == "partial" and plan.computed == {0}
    assert plan.positions == list(range(4, 11)) + [T - 1]       # slot 0, its segment, the last token
    assert plan.decisions["agent_a_current"] == "share"
    assert plan.decisions["user_question"].endswith("(new anchor)")


def test_prefix_only_computes_every_slot_after_the_first_computed_one():
    # The first slot computed: nothing estimated is left before it, so the call is dense.
    _, plan, _ = plan_of(pool_with({"agent_a_current"}), PlanSettings(prefix_only=True))
    assert plan.path == "dense" and plan.computed == {0, 1}
    assert plan.positions == list(range(4, T)) and plan.prefix == 4   # a suffix after S0
    assert "after a computed slot" in plan.decisions["agent_a_current"]
    _, plan, _ = plan_of(pool_with({"user_question"}), PlanSettings(prefix_only=True))
    assert plan.path == "partial" and plan.computed == {1}
    assert plan.prefix == 11 and plan.positions == list(range(11, T))


def test_no_partial_calls_run_such_calls_dense_after_the_exact_prefix():
    _, plan, _ = plan_of(pool_with({"agent_a_current"}), PlanSettings(partial=False))
    assert plan.path == "dense" and plan.s0 == 4 and plan.positions == list(range(4, T))
    assert plan.reason.startswith("slot user_question: too_few_candidates")


def test_prefix_only_takes_only_suffix_recompute_policies():
    for policy in ("segments", "first=2", "spread,budget=0.1"):
        with pytest.raises(ValueError, match="prefix of the prompt only"):
            PlanSettings(prefix_only=True, recompute=policy)
    _, plan, _ = plan_of(pool_with(set(SLOTS)), PlanSettings(prefix_only=True, recompute="tail=5"))
    assert plan.path == "reuse" and plan.positions == list(range(T - 5, T))


def test_a_content_without_a_base_is_computed_and_not_decided():
    st = Session(index=1)   # nothing encoded, no encode callback
    _, plan, st = plan_of(pool_with(set(SLOTS)), PlanSettings(prefix_only=True), st=st)
    assert plan.path == "dense" and plan.contents == [None, None]
    assert plan.reason == "slot user_question: no base KV; slot agent_a_current: no base KV"
    assert st.contents == {}


def test_encode_is_called_once_per_content_and_counted():
    calls = []

    def encode(kind, ids):
        calls.append((kind, ids))
        return content("user_question" if kind == "question" else "agent_a_current", 0)
    planner = Planner(pool_with(set(SLOTS)), ROPE)
    st = Session(index=1)
    p1 = planner.plan(agent(), layout(), st, max_new_tokens=4, encode=encode)
    p2 = planner.plan(agent(), layout(), st, max_new_tokens=4, encode=encode)
    assert [k for k, _ in calls] == ["question", "reply"]
    assert p1.encoded_tokens == 9 and p2.encoded_tokens == 0
    assert p1.contents[0] is p2.contents[0]   # decided once per session


def test_refusals_decide_nothing():
    pool = pool_with(set(SLOTS))
    planner, plan, st = plan_of(pool, PlanSettings(), refusal="correctness gate: no")
    assert plan.path == "dense" and plan.reason == "correctness gate: no" and st.contents == {}
    other = layout()
    other.ids[2] += 1   # S0 differs from the agent's template
    plan = planner.plan(agent(), other, session_with_bases(), max_new_tokens=4)
    assert plan.path == "dense" and plan.reason == "prefix S0 tokens differ from the template's"
    assert plan.s0 == 2   # the exact prefix stops at the first differing token
    far = Planner(pool, SimpleNamespace(inv_freq=ROPE.inv_freq, exact_positions=20, rope_type="yarn"))
    plan = far.plan(agent(), layout(), session_with_bases(), max_new_tokens=4)
    assert plan.path == "dense" and "20 positions" in plan.reason


def test_assemble_writes_s0_and_estimates_and_demotes_what_it_cannot_estimate():
    pool = pool_with(set(SLOTS))
    planner, plan, _ = plan_of(pool, PlanSettings(prefix_only=True))
    k = torch.full((L, H, T - 1, D), float("nan"))
    v = k.clone()
    planner.assemble(plan, k, v)
    assert plan.path == "reuse"
    assert torch.equal(k[:, :, :4], agent().s0_k) and not k.isnan().any()
    # Anchors of the first slot evicted after the decision: prefix-only demotes both slots.
    planner, plan, _ = plan_of(pool_with(set(SLOTS)), PlanSettings(prefix_only=True))
    planner.pool = pool_with({"agent_a_current"})
    planner.assemble(plan, k, v)
    assert plan.path == "dense" and plan.computed == {0, 1} and plan.s0 == 4
    assert plan.decisions["user_question"] == "share, but no usable anchor for this agent"


def test_record_stores_deltas_of_computed_slots_only():
    pool = pool_with({"agent_a_current"})
    planner, plan, st = plan_of(pool, PlanSettings())
    k, v = torch.randn(L, H, T, D), torch.randn(L, H, T, D)
    planner.assemble(plan, k, v)
    assert planner.record(plan, k, v) == 1
    (anchor,) = pool.anchors("user_question")
    assert anchor.agents == ["b@x"] and plan.contents[0].anchor_id == anchor.id
    got = pool.anchor_deltas("user_question", anchor.id, "b@x")
    torch.testing.assert_close(got["ph_v"], v[:, :, 4:9] - plan.contents[0].base_v)
    assert all(len(a.agents) == 1 for a in pool.anchors("agent_a_current"))   # nothing new recorded there
    _, plan, _ = plan_of(pool_with(set()), PlanSettings(), learn=False)
    assert planner.record(plan, k, v) == 0   # learn=False records nothing



def test_a_record_reads_from_its_first_computed_slot():
    """A partial call with its last slot computed records from that slot on: the KV before it
    need not be read back, and the deltas are those of the whole buffers."""
    def recorded(start):
        pool = pool_with({"user_question"})
        planner, plan, _ = plan_of(pool, PlanSettings(prefix_only=True))
        assert plan.path == "partial" and plan.computed == {1}
        assert planner.record_start(plan) == SPANS[1][1]   # the computed slot's first token
        torch.manual_seed(7)
        k, v = torch.randn(L, H, T, D), torch.randn(L, H, T, D)
        assert planner.record(plan, k[:, :, start:].clone(), v[:, :, start:].clone(), start) == 1
        (anchor,) = pool.anchors("agent_a_current")
        return pool.anchor_deltas("agent_a_current", anchor.id, "b@x")
    whole, window = recorded(0), recorded(SPANS[1][1])
    assert all(torch.equal(whole[f], window[f]) for f in ("ph_k", "ph_v", "seg_k", "seg_v"))
    # nothing to record: no start (a call with learn=False)
    planner, plan, _ = plan_of(pool_with(set()), PlanSettings(), learn=False)
    assert planner.record_start(plan) is None


def test_capture_decides_a_reply_once_per_session():
    pool = pool_with(set(SLOTS))
    planner = Planner(pool, ROPE)
    st = Session(index=1)
    k, v = torch.randn(L, H, 4, D), torch.randn(L, H, 4, D)
    c1 = planner.capture(st, "a", [1, 2, 3, 4], k, v, 30, text="hi")
    c2 = planner.capture(st, "a", [1, 2, 3, 4], k, v, 30)
    assert c1 is c2 and st.current["a"].ids == (1, 2, 3, 4)
    torch.testing.assert_close(st.current["a"].v, v)
    with pytest.raises(ValueError, match="4 reply tokens"):
        planner.capture(st, "a", [1, 2, 3, 4], k[:, :, :3], v, 30)


def test_sessions_forget_the_least_recent_and_age_replies_by_round():
    s = Sessions(limit=2)
    a = s.get("a")
    a.current["x"] = "reply"
    s.get("b")
    assert s.get("a", rnd=1) is a and a.history == {"x": "reply"} and a.current == {}
    s.get("c")                      # "b" is the least recently used
    assert "b" not in s and "a" in s and len(s) == 2


def test_a_first_carrier_computes_in_context_and_still_teaches_the_pool():
    """defer_first_encoding: the call carrying a content first does not encode it before its
    first token; once the base exists (encode_deferred), settle decides the content and
    records that call's deltas, so a content only one agent reads still grows the pool."""
    pool = pool_with(set())
    planner = Planner(pool, ROPE, PlanSettings(defer_first_encoding=True))
    calls = []

    def encode(kind, ids):
        calls.append(kind)
        return content("user_question" if kind == "question" else "agent_a_current", 0)
    st = Session(index=1)
    plan = planner.plan(agent(), layout(), st, max_new_tokens=4, encode=encode)
    assert calls == [] and plan.path == "dense" and plan.first_carrier == set(SLOTS)
    assert plan.reason.startswith("slot user_question: first carrier")
    assert [k for k, _ in plan.deferred] == ["question", "reply"] and st.contents == {}
    k, v = torch.randn(L, H, T, D), torch.randn(L, H, T, D)
    assert planner.record(plan, k, v) == 0 and set(plan.late) == {0, 1}   # kept until the bases exist
    assert planner.encode_deferred(plan, st, encode) == 9 and calls == ["question", "reply"]
    assert planner.settle(plan, st) == 2 and plan.late == {}
    for i, (slot, a, b) in enumerate(SPANS):
        (anchor,) = pool.anchors(slot)
        assert anchor.agents == ["b@x"]
        got = pool.anchor_deltas(slot, anchor.id, "b@x")
        torch.testing.assert_close(got["ph_v"], v[:, :, a:b] - st.contents[(slot, tuple(layout().ids[a:b]))].base_v)
    # the next carrier of the same contents in this session finds them decided
    again = planner.plan(agent(), layout(), st, max_new_tokens=4, encode=encode)
    assert again.first_carrier == set() and calls == ["question", "reply"]


def test_sessions_are_bounded_by_the_kv_they_hold():
    s = Sessions(limit=100, max_bytes=10 * 1024)
    for i in range(5):
        st = s.get(f"s{i}")
        st.encoded[("question", (i,))] = (torch.zeros(256), torch.zeros(256))   # 2 KiB
        shared = torch.zeros(256)
        st.current["a"] = Reply("a", "", (1,), shared, shared)                   # 1 KiB: shared storage counts once
    s.get("s4")                                  # 3 KiB a session: 3 fit in 10 KiB
    assert s.bytes == 9 * 1024 and len(s) == 3 and "s4" in s and "s1" not in s
    assert s.dropped == 2


def test_slots_in_the_backends_prefix_cache_are_used_as_cached():
    """cached=N: a slot that lies with its segment before N (vLLM's prefix cache holds it, from
    the tenant's earlier request) is neither decided, estimated nor recorded - its cached KV may
    itself be an earlier call's estimate - and does not make the call dense or partial."""
    # user_question (4..9, segment to 11) is cached; its pool is cold (it would be a new anchor)
    pool = pool_with({"agent_a_current"})
    planner, plan, _ = plan_of(pool, PlanSettings(prefix_only=True), cached=12)
    assert plan.slots[0].cached and plan.contents[0] is None
    assert "prefix cache" in plan.decisions["user_question"] and pool.anchors("user_question") == []
    assert plan.path == "reuse" and plan.prefix == T - 1 and plan.computed == set()
    k, v = torch.zeros(L, H, T, D), torch.zeros(L, H, T, D)
    planner.assemble(plan, k, v)
    assert k[:, :, 4:11].abs().sum() == 0 and k[:, :, 11:18].abs().sum() > 0   # the cached slot is not written
    assert planner.record(plan, k, v) == 0
    # A cached slot whose segment runs past the cached tokens: the rest of the segment is
    # computed, and (prefix-only) everything after it; the slot itself is still not decided.
    pool = pool_with({"agent_a_current"})
    _, plan, _ = plan_of(pool, PlanSettings(prefix_only=True), cached=10)
    assert plan.slots[0].cached and plan.path == "dense" and plan.computed == {1}
    assert pool.anchors("user_question") == []
    _, plan, _ = plan_of(pool_with({"agent_a_current"}), PlanSettings(), cached=10)   # not prefix-only
    assert plan.path == "reuse" and plan.positions == [10, T - 1]
    # A slot that runs past the cached tokens is planned as usual.
    _, plan, _ = plan_of(pool_with({"agent_a_current"}), PlanSettings(prefix_only=True), cached=8)
    assert not plan.slots[0].cached and plan.path == "dense"
    # Every content cached: nothing to estimate; a dense plan that says why.
    _, plan, _ = plan_of(pool_with(set()), PlanSettings(prefix_only=True), cached=18)
    assert plan.path == "dense" and "every content in the backend's prefix cache" in plan.reason
    # A dense plan records only what it did not find cached.
    pool = pool_with(set())
    planner, plan, _ = plan_of(pool, PlanSettings(prefix_only=True), cached=12)
    assert plan.path == "dense" and planner.record(plan, k, v) == 1
    assert pool.anchors("user_question") == [] and len(pool.anchors("agent_a_current")) == 1
