"""Partial reuse, selective recompute and the scattered forward behind them.

- the scattered forward is an ordinary prefill where it should be (every position after
  a prefix) and leaves untouched KV alone where it should (a few positions);
- a partial call (one slot new, one estimated) has KV equal to dense up to the end of
  everything computed before the first estimated slot, and records real deltas there;
- recomputed positions follow the policy and its budget;
- token accounting of every path; teacher-forced reply logits equal a plain forward.
"""
from __future__ import annotations

import pytest
import torch

import kvcomm
from kvcomm.engine import KVCommEngine
from kvcomm.plan.recompute import RecomputePolicy, SlotPlan, select_positions
from kvcomm.engine.scatter import forward_scattered
from kvcomm.hf.cache import KVBufferCache

SYSTEM = "You are a careful assistant."
TWO_SLOTS = "Question:\n{user_question}\nContext:\n{condition_tool_current}\nAnswer it."
LONG_Q = ["How many legs do three cats and two birds have together, in total, today?",
          "Which of the planets in our solar system has the most moons right now, and why?",
          "What do you get when you add the first five odd numbers together, step by step?"]
SHORT_C = ["Cats have four legs.", "Birds have two legs.", "Odd numbers: 1, 3, 5, 7, 9."]
LONG_C = ["A cat has four legs and a tail. A bird has two legs and two wings, and it can fly.",
          "Saturn has more known moons than Jupiter, after many small ones were found in recent years.",
          "The odd numbers one, three, five, seven and nine add up to twenty five, a square number."]
F32_ATOL = 1e-4


def engine(model, tok, **kw):
    spec = kvcomm.hf.inspect_model(model)
    cfg = kvcomm.PoolConfig(tau=1e-3, layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim)
    eng = KVCommEngine(model, tok, pool_config=cfg, **kw)
    eng.add_agent("a", SYSTEM, TWO_SLOTS)
    return eng


def call(eng, inputs, mode="kvcomm", **kw):
    eng.new_request()
    return eng.call("a", inputs, mode=mode, max_new_tokens=1, keep_cache=True, **kw)


def kv(c):
    T = c.layout.length
    k, v = c.cache.span(0, T)
    return k.clone(), v.clone()


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def warm(eng, n=3):
    # Long questions and long contexts: anchors that cover the shorter contents asked later.
    for q, cond in zip(LONG_Q[:n], LONG_C[:n]):
        call(eng, {"user_question": q, "condition_tool_current": cond})


# ------------------------------------------------------------------ scattered forward


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scattered_forward_is_a_prefill_and_keeps_other_positions(tiny, arch):
    model, _ = tiny(arch)
    spec = kvcomm.hf.enable(model)
    ids = list(range(7, 40))
    T = len(ids)
    with torch.inference_mode():
        dense = KVBufferCache.for_spec(spec, T)
        ref = model(input_ids=torch.tensor([ids]), past_key_values=dense, use_cache=True).logits[0].float()
        # Every position after a prefix: an ordinary prefill, logits of the last rows too.
        part = KVBufferCache.for_spec(spec, T)
        part.k[:, :, :9].copy_(dense.k[:, :, :9])
        part.v[:, :, :9].copy_(dense.v[:, :, :9])
        logits = forward_scattered(model, part, ids[9:], list(range(9, T)), T, logits_rows=4)
        assert maxdiff(part.k[:, :, :T], dense.k[:, :, :T]) < 1e-5
        assert maxdiff(logits, ref[-4:]) < 1e-4
        # A few scattered positions over garbage there: recomputed exactly; the others untouched.
        sc = KVBufferCache.for_spec(spec, T)
        sc.k.copy_(dense.k)
        sc.v.copy_(dense.v)
        pos = [3, 11, 12, T - 1]
        sc.k[:, :, pos] = 7.0
        sc.v[:, :, pos] = -7.0
        marker = sc.k[:, :, 5].clone()
        last = forward_scattered(model, sc, [ids[p] for p in pos], pos, T)
        assert maxdiff(sc.k[:, :, :T], dense.k[:, :, :T]) < 1e-5 and maxdiff(sc.v[:, :, :T], dense.v[:, :, :T]) < 1e-5
        assert torch.equal(sc.k[:, :, 5], marker) and sc.length == T
        assert maxdiff(last[0], ref[-1]) < 1e-4


def test_scattered_positions_are_checked(tiny):
    model, _ = tiny("llama")
    spec = kvcomm.hf.enable(model)
    cache = KVBufferCache.for_spec(spec, 8)
    for ids, pos, msg in (([1, 2], [3, 3], "strictly increasing"), ([1], [8], "in \\[0, 8\\)"),
                          ([1, 2], [1], "2 ids for 1 positions"), ([], [], "no positions")):
        with pytest.raises(ValueError, match=msg):
            forward_scattered(model, cache, ids, pos, 8)


# ------------------------------------------------------------------ policies


def slots(*specs):
    return [SlotPlan(name=f"s{i}", span=sp, segment=sg, estimated=est, spread=spr)
            for i, (sp, sg, est, spr) in enumerate(specs)]


def test_policy_parse_and_errors():
    assert RecomputePolicy.parse("none") == RecomputePolicy()
    p = RecomputePolicy.parse("segments,first=4,spread,budget=0.1,tail=2")
    assert (p.segments, p.first, p.spread, p.budget, p.tail) == (True, 4, True, 0.1, 2)
    assert RecomputePolicy.parse(p.describe()) == p and RecomputePolicy().describe() == "none"
    for bad, msg in (("segment", "unknown part"), ("spread", "needs a budget"), ("tail=0", "tail must be"),
                     ("budget=2", "budget must be"), ("first=x", "unknown part")):
        with pytest.raises(ValueError, match=msg):
            RecomputePolicy.parse(bad)


def test_selection_follows_the_policy_and_its_budget():
    # S0 = 10 tokens; slot 0 [10,20) seg [20,24); slot 1 [24,40) seg [40,45); T = 45.
    sp = torch.zeros(16)
    sp[[3, 9]] = torch.tensor([5.0, 9.0])
    plan = slots(((10, 20), (20, 24), True, torch.linspace(0, 1, 10)), ((24, 40), (40, 45), True, sp))
    assert select_positions(RecomputePolicy(), plan, 10, 45).positions == [44]
    sel = select_positions(RecomputePolicy(segments=True), plan, 10, 45)
    assert sel.positions == list(range(20, 24)) + list(range(40, 45))
    assert sel.counts == {"tail": 1, "segments": 8}
    # Budget 0.2 of 35 tokens = 7: the last segment (4 more than the tail) fits, the first
    # (4) no longer does; first=2 then takes 2 tokens of slot 0 and the 1 left of slot 1.
    sel = select_positions(RecomputePolicy(segments=True, first=2, budget=0.2), plan, 10, 45)
    assert sel.positions == [10, 11, 24] + list(range(40, 45))
    assert sel.counts == {"tail": 1, "segments": 4, "first": 3}
    # spread fills the budget with the highest-spread tokens, across slots.
    sel = select_positions(RecomputePolicy(spread=True, budget=2 / 35), plan, 10, 45)
    assert sel.positions == [27, 33, 44] and sel.counts["spread"] == 2
    # A computed slot and its segment are always run, and never count toward the budget.
    plan[0].estimated = False
    sel = select_positions(RecomputePolicy(budget=0.0), plan, 10, 45)
    assert sel.positions == list(range(10, 24)) + [44] and sel.counts["slots"] == 14
    # tail never reaches into S0.
    assert select_positions(RecomputePolicy(tail=100), plan, 10, 45).positions == list(range(10, 45))


# ------------------------------------------------------------------ partial calls


def test_partial_call_is_exact_before_its_first_estimated_slot(smollm2):
    model, tok = smollm2
    eng = engine(model, tok, head_share=0.0)   # the long question is computed whole, not its tail
    warm(eng)
    # A question longer than every anchor (no candidate: a new anchor, computed) and a
    # short condition (shared, estimated): a partial call.
    q = ("Why is the sea salty, and why are the rivers that flow into it not salty at all, "
         "even though they carry the same minerals over many thousands of years?")
    inputs = {"user_question": q, "condition_tool_current": SHORT_C[0]}
    part = call(eng, inputs)
    assert part.path == "partial", part.reason
    assert "user_question" in part.reason and "new anchor" in part.slot_decisions["user_question"]
    assert part.slot_anchors.get("condition_tool_current")
    dense = call(eng, inputs, mode="dense")
    pk, pv = kv(part)
    dk, dv = kv(dense)
    lay = part.layout
    _, a, b = lay.spans[0]
    sa, sb = lay.segments[0]
    assert sa == b
    # S0, the computed question and its segment: real KV (nothing estimated before them).
    assert maxdiff(pk[:, :, :sb], dk[:, :, :sb]) < F32_ATOL and maxdiff(pv[:, :, :sb], dv[:, :, :sb]) < F32_ATOL
    # The estimated condition differs from dense on deeper layers (it was not recomputed).
    _, c, d = lay.spans[1]
    assert maxdiff(pv[1:, :, c:d], dv[1:, :, c:d]) > 1e-3
    # Accounting: S0 copied, the question + its segment + the last token computed.
    assert part.s0_tokens == eng.agents["a"].s0 == a
    assert part.computed_tokens == (sb - a) + 1 and part.recomputed == {"tail": 1, "slots": sb - a}
    # The new anchor recorded the real deltas: real KV minus its base, in the neutral frame.
    anchor = [x for x in eng.pool.anchors("user_question") if x.length == b - a][-1]
    deltas = eng.pool.anchor_deltas("user_question", anchor.id, eng.agents["a"].key)
    base_k, base_v = eng.pool.anchor_base("user_question", anchor.id)
    assert maxdiff(deltas["ph_v"], dv[:, :, a:b] - base_v) < F32_ATOL
    real_k = kvcomm.ops.rope_move(dk[:, :, a:b].contiguous(), eng.spec.inv_freq, -a)
    assert maxdiff(deltas["ph_k"], real_k - base_k) < F32_ATOL


def test_partial_can_be_turned_off(smollm2):
    model, tok = smollm2
    eng = engine(model, tok, partial=False)
    warm(eng)
    q = "Why is the sea salty, and why are the rivers that flow into it not salty at all, over all those years?"
    c = call(eng, {"user_question": q, "condition_tool_current": SHORT_C[1]})
    assert c.path == "dense" and "user_question" in c.reason
    assert c.computed_tokens == c.prompt_tokens - c.s0_tokens and c.s0_tokens == eng.agents["a"].s0


def test_reuse_path_recomputes_what_the_policy_chose(smollm2):
    model, tok = smollm2
    eng = engine(model, tok, recompute="segments")
    warm(eng)
    inputs = {"user_question": "What is five plus nine?", "condition_tool_current": SHORT_C[2]}
    c = call(eng, inputs)
    assert c.path == "reuse", c.reason
    lay = c.layout
    seg_tokens = sum(b - a for a, b in lay.segments)
    # (the last segment stops before the prompt's last token, the tail)
    assert c.recomputed == {"tail": 1, "segments": seg_tokens}
    assert c.computed_tokens == seg_tokens + 1 and c.s0_tokens == lay.spans[0][1]
    # The recomputed segments hold what the model computes given the estimated slots:
    # running the same positions again over the same cache changes nothing.
    k, v = kv(c)
    pos = [p for a, b in lay.segments for p in range(a, b)] + [lay.length - 1]
    cache = c.cache
    forward_scattered(model, cache, [lay.ids[p] for p in pos], pos, lay.length)
    assert maxdiff(cache.k[:, :, :lay.length], k) < 1e-5
    # And the dense baseline computes every token, copying nothing.
    d = call(eng, inputs, mode="dense")
    assert (d.s0_tokens, d.computed_tokens, d.encoded_tokens) == (0, d.prompt_tokens, 0)


def test_first_consumer_pays_for_encoding(smollm2):
    model, tok = smollm2
    eng = engine(model, tok)
    eng.add_agent("b", SYSTEM, "Check this.\n{user_question}\nContext:\n{condition_tool_current}\nOK?")
    eng.new_request()
    inputs = {"user_question": "What is two plus two?", "condition_tool_current": SHORT_C[0]}
    first = eng.call("a", inputs, max_new_tokens=1)
    second = eng.call("b", inputs, max_new_tokens=1)
    n = sum(b - a for _, a, b in eng.call("a", inputs, max_new_tokens=1, keep_cache=True, capture=False).layout.spans)
    assert first.encoded_tokens == n and second.encoded_tokens == 0


# ------------------------------------------------------------------ teacher forcing


def test_reply_logits_are_teacher_forced_logits(smollm2):
    model, tok = smollm2
    eng = engine(model, tok)
    inputs = {"user_question": "Name a red fruit.", "condition_tool_current": SHORT_C[0]}
    eng.new_request()
    gen = eng.call("a", inputs, mode="dense", max_new_tokens=6, reply_logits=4, keep_cache=True)
    assert gen.reply_logits.shape[0] == min(4, len(gen.token_ids))
    ids = list(gen.layout.ids) + gen.token_ids
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids])).logits[0].float()
    T = gen.prompt_tokens
    rows = gen.reply_logits.shape[0]
    assert maxdiff(gen.reply_logits, full[T - 1:T - 1 + rows]) < 1e-3
    # The same reply forced: identical rows, in dense and in kvcomm mode on a cold pool
    # (every slot computed there, so kvcomm equals dense).
    for mode in ("dense", "kvcomm"):
        eng.new_request()
        forced = eng.call("a", inputs, mode=mode, reply_ids=gen.token_ids, reply_logits=4)
        assert forced.token_ids == gen.token_ids
        assert maxdiff(forced.reply_logits, gen.reply_logits) < 1e-3
    with pytest.raises(ValueError, match="reply_logits"):
        eng.call("a", inputs, reply_logits=-1)
