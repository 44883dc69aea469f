"""The baselines' estimators and selection policies (kvcomm.plan.estimators, the
'segfirst' and 'deviation' recompute parts, the early-layer probe), and the token
accounting every method reports against what the model actually ran.

- positions are chosen as stated (segfirst: the first K of each segment; deviation: the
  budget's highest deviations, never the exact prefix, ties by position);
- the `base` estimator writes exactly the moved base and the moved template segment;
- the probe's deviation is zero where the buffer holds the model's own KV, and finds the
  positions that were perturbed; the probed layers then hold the computed KV;
- recompute is exact where it should be: a deviation or EPIC budget covering every token
  after S0 gives dense's KV and logits; the `none` estimator is dense after the exact S0;
- a forward hook counts the tokens the model ran; the calls' counts match it.
"""
from __future__ import annotations

import pytest
import torch

import kvcomm
from kvcomm.engine import KVCommEngine
from kvcomm.engine.probe import decoder_layers, probe_deviation
from kvcomm.plan.recompute import RecomputePolicy, SlotPlan, select_positions

SYSTEM = "You are a careful assistant."
TEMPLATE = "Question:\n{user_question}\nContext:\n{condition_tool_current}\nAnswer it."
QUESTIONS = ["How many legs do three cats and two birds have together, in total, today?",
             "Which of the planets in our solar system has the most moons right now, and why?",
             "What do you get when you add the first five odd numbers together, step by step?",
             "Why is the sky blue on a clear day and red when the sun sets in the evening?"]
CONTEXTS = ["A cat has four legs and a tail. A bird has two legs and two wings, and it can fly.",
            "Saturn has more known moons than Jupiter, after many small ones were found in recent years.",
            "The odd numbers one, three, five, seven and nine add up to twenty five, a square number.",
            "Air scatters blue light more than red light, and at sunset the light crosses more air."]
ATOL = 1e-4


def make(model, tok, **kw):
    spec = kvcomm.hf.inspect_model(model)
    cfg = kvcomm.PoolConfig(layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim, gamma=2.0)
    eng = KVCommEngine(model, tok, pool_config=cfg, **kw)
    eng.add_agent("a", SYSTEM, TEMPLATE)
    return eng


def one(eng, i, mode="kvcomm", **kw):
    eng.new_request()
    return eng.call("a", {"user_question": QUESTIONS[i], "condition_tool_current": CONTEXTS[i]}, mode=mode,
                    max_new_tokens=1, keep_cache=True, return_first_logits=True, **kw)


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def kv(c):
    k, v = c.cache.span(0, c.layout.length)
    return k.clone(), v.clone()


# ------------------------------------------------------------------ policies, as stated


def test_segfirst_and_deviation_choose_as_stated():
    slots = [SlotPlan("q", (10, 20), (20, 25), True), SlotPlan("c", (25, 40), (40, 50), True),
             SlotPlan("r", (50, 55), (55, 60), False)]
    sel = select_positions(RecomputePolicy.parse("segfirst=3"), slots, 10, 61)
    # the first 3 tokens of the estimated slots' segments; the computed slot and its segment; the tail
    assert sel.counts == {"tail": 1, "slots": 10, "segfirst": 6}
    assert set(sel.positions) == {20, 21, 22, 40, 41, 42, 60} | set(range(50, 60))
    epic = select_positions(RecomputePolicy.parse("first=2,segfirst=2"), slots[:2], 10, 61)
    assert set(epic.positions) == {10, 11, 25, 26, 20, 21, 40, 41, 60}
    # deviation: the budget's highest deviations after S0, ties by position, chosen ones skipped
    dev = torch.zeros(51)
    dev[[3, 7, 30, 31]] = torch.tensor([5.0, 9.0, 5.0, 1.0])   # positions 13, 17, 40, 41
    sel = select_positions(RecomputePolicy.parse("deviation,budget=0.06"), slots[:2], 10, 61, deviation=dev)
    assert sel.counts == {"tail": 1, "deviation": 3} and sel.positions == [13, 17, 40, 60]
    # no probe yet: no deviation tokens; a budget of 0 chooses none
    assert select_positions(RecomputePolicy.parse("deviation,budget=0.5"), slots[:2], 10, 61).positions == [60]
    assert select_positions(RecomputePolicy.parse("deviation,budget=0"), slots[:2], 10, 61,
                            deviation=dev).positions == [60]
    # the tail already chosen is not counted twice: 0.1 of 51 -> 5 tokens besides it
    dev[50] = 100.0
    sel = select_positions(RecomputePolicy.parse("deviation,budget=0.1"), slots[:2], 10, 61, deviation=dev)
    assert sel.counts["deviation"] == 5 and 60 in sel.positions


def test_policy_strings_round_trip_and_refuse():
    for text in ("deviation,budget=0.15", "deviation,layer=2,budget=0.05", "first=4,segfirst=4",
                 "segments,segfirst=2,budget=0.1"):
        p = RecomputePolicy.parse(text)
        assert RecomputePolicy.parse(p.describe()) == p
    with pytest.raises(ValueError, match="needs a budget"):
        RecomputePolicy.parse("deviation")
    with pytest.raises(ValueError, match="segfirst"):
        RecomputePolicy(segfirst=-1)
    from kvcomm.plan.planner import PlanSettings
    with pytest.raises(ValueError, match="prefix of the prompt only"):
        PlanSettings(prefix_only=True, recompute="deviation,budget=0.1")
    with pytest.raises(ValueError, match="unknown estimator"):
        PlanSettings(estimator="magic")


# ------------------------------------------------------------------ estimators


def test_base_estimator_writes_the_moved_base_and_template(tiny):
    model, tok = tiny("llama")
    eng = make(model, tok, estimator="base")
    c = one(eng, 0)
    assert c.path == "reuse" and c.computed_tokens == 1 and eng.pool.size() == 0
    assert c.encoded_tokens == sum(b - a for _, a, b in c.layout.spans)   # the bases it encoded
    k, v = kv(c)
    inv = eng.spec.inv_freq
    for i, (name, a, b) in enumerate(c.layout.spans):
        content = eng.request.contents[(name, tuple(c.layout.ids[a:b]))]
        assert torch.equal(v[:, :, a:b], content.base_v)
        assert maxdiff(k[:, :, a:b], kvcomm.ops.rope_move(content.base_k, inv, a)) < 1e-6
        sa, sb = c.layout.segments[i]
        if sb > sa:
            st = eng.agents["a"]
            assert torch.equal(v[:, :, sa:sb], st.seg_v[i])
            assert maxdiff(k[:, :, sa:sb], kvcomm.ops.rope_move(st.seg_k[i], inv, sa)) < 1e-6
    # layer 0 of a moved base is the real KV (docs/method.md, "Keys move exactly"); deeper layers are not
    d = one(eng, 0, mode="dense")
    dk, dv = kv(d)
    _, a, b = c.layout.spans[0]
    assert maxdiff(v[0, :, a:b], dv[0, :, a:b]) < ATOL and maxdiff(v[1:, :, a:b], dv[1:, :, a:b]) > 1e-3


def test_prefix_only_estimator_is_dense_after_the_exact_prefix(tiny):
    model, tok = tiny("llama")
    eng = make(model, tok, estimator="none")
    c = one(eng, 1)
    d = one(eng, 1, mode="dense")
    assert c.path == "dense" and "prefix caching only" in c.reason
    assert c.s0_tokens == eng.agents["a"].s0 > 0 and c.computed_tokens == c.prompt_tokens - c.s0_tokens
    assert c.encoded_tokens == 0 and eng.pool.size() == 0 and not eng.request.current   # nothing encoded or captured
    assert maxdiff(c.first_logits, d.first_logits) < ATOL and c.first_token_id == d.first_token_id


@pytest.mark.parametrize("policy", ["deviation,budget=1", "first=1000,segfirst=1000"])
@pytest.mark.parametrize("estimator", ["base", "anchors"])
def test_recompute_covering_every_token_is_exact(tiny, policy, estimator):
    """A budget that covers every token after S0 recomputes all of them: dense's KV and logits."""
    model, tok = tiny("llama")
    eng = make(model, tok, estimator=estimator, recompute=policy)
    for i in range(3):   # anchors: enough for the slots to share (gamma 2 shares from 2 candidates)
        one(eng, i)
    c = one(eng, 3)
    d = one(eng, 3, mode="dense")
    if estimator == "anchors" and policy.startswith("first"):
        assert c.path in ("reuse", "partial")
    assert c.path != "dense", c.reason
    if policy.startswith("deviation"):
        assert c.probed_tokens == c.prompt_tokens - c.s0_tokens and c.probe_fraction > 0
    # segfirst/first=1000 covers the slots and segments; the last segment ends at the tail
    assert c.computed_tokens == c.prompt_tokens - c.s0_tokens
    k, v = kv(c)
    dk, dv = kv(d)
    assert maxdiff(k, dk) < ATOL and maxdiff(v, dv) < ATOL
    assert maxdiff(c.first_logits, d.first_logits) < ATOL


# ------------------------------------------------------------------ the probe


def test_probe_measures_deviation_on_its_layer_and_keeps_the_computed_kv(tiny):
    model, tok = tiny("llama", num_hidden_layers=3)
    eng = make(model, tok)
    d = one(eng, 2, mode="dense")
    dk, dv = kv(d)
    T = d.layout.length
    s0 = eng.agents["a"].s0
    positions = list(range(s0, T))
    ids = [d.layout.ids[p] for p in positions]
    # The buffer holds dense KV: the model computes the same, deviation ~ 0 everywhere.
    cache = d.cache
    dev = probe_deviation(model, cache, ids, positions, T, layer=1)
    assert dev.shape == (T - s0,) and float(dev.max()) < 1e-8
    # Perturb layer 1 at three positions (and layer 2 elsewhere): the probe of layer 1 finds
    # exactly those three, and afterwards layers 0..1 hold the computed KV again.
    hit = [s0 + 2, s0 + 9, T - 3]
    with torch.inference_mode():
        cache.v[1, :, hit] += 0.5
        cache.k[2, :, s0 + 4] += 3.0
    dev = probe_deviation(model, cache, ids, positions, T, layer=1)
    top = sorted((torch.topk(dev, 3).indices + s0).tolist())
    assert top == sorted(hit)
    others = [i for i in range(T - s0) if i + s0 not in hit]
    assert float(dev[others].max()) < 1e-8
    assert maxdiff(cache.v[:2, :, :T], dv[:2]) < 1e-5 and maxdiff(cache.k[:2, :, :T], dk[:2]) < 1e-5
    assert float((cache.k[2, :, s0 + 4] - dk[2, :, s0 + 4]).abs().max()) > 1.0   # the probe stopped at layer 1
    with pytest.raises(ValueError, match="probe layer"):
        probe_deviation(model, cache, ids, positions, T, layer=3)


# ------------------------------------------------------------------ accounting vs a forward hook


class TokenCounter:
    """Tokens through the model's embedding (every forward) and through its last decoder
    layer (forwards that ran every layer)."""

    def __init__(self, model):
        self.embedded = self.full = 0
        emb = model.get_input_embeddings()
        last = decoder_layers(model)[-1]
        self._h = [emb.register_forward_hook(self._emb), last.register_forward_hook(self._last)]

    def _emb(self, _m, args, _out):
        self.embedded += args[0].numel()

    def _last(self, _m, args, _out):
        self.full += args[0].shape[1]

    def take(self):
        out = (self.embedded, self.full)
        self.embedded = self.full = 0
        return out

    def close(self):
        for h in self._h:
            h.remove()


@pytest.mark.parametrize("estimator,policy", [("anchors", "none"), ("anchors", "deviation,budget=0.2"),
                                              ("base", "deviation,budget=0.15"), ("base", "first=2,segfirst=2"),
                                              ("none", "none")])
def test_reported_token_counts_match_the_tokens_the_model_ran(tiny, estimator, policy):
    """Per call with a forced reply: the model ran computed_tokens (the prompt), encoded_tokens
    (contents behind their headers) and the reply through every layer, and the probe's
    tokens through its first layers only."""
    model, tok = tiny("llama", num_hidden_layers=3)
    eng = make(model, tok, estimator=estimator, recompute=policy)
    eng.add_agent("b", SYSTEM, "Check:\n{user_question}\nReply:\n{agent_a_current}\nRight?")
    for kind in eng.encoder.lead_ins:   # the headers' own KV is computed once per engine, up front
        eng.encoder._header_kv(kind)
    counter = TokenCounter(model)
    reply = tok("The answer is four legs in all.", add_special_tokens=False)["input_ids"]
    seen = []
    try:
        for i in range(4):
            eng.new_request()
            q = {"user_question": QUESTIONS[i]}
            for agent, inputs in (("a", {**q, "condition_tool_current": CONTEXTS[i]}),
                                  ("b", {**q, "agent_a_current": "The answer is four legs in all."})):
                counter.take()
                c = eng.call(agent, inputs, reply_ids=reply)
                embedded, full = counter.take()
                assert full == c.computed_tokens + c.encoded_tokens + len(reply), (c.path, c.reason)
                assert embedded == full + c.probed_tokens
                seen.append((c.path, c.encoded_tokens, c.probed_tokens))
    finally:
        counter.close()
    if estimator != "none":
        assert any(e for _, e, _ in seen), "some call encoded a content"
    if "deviation" in policy:
        assert any(p for path, _, p in seen if path != "dense"), "some call probed"


# ------------------------------------------------------------------ fitted weights


def test_simplex_fit_recovers_a_convex_combination():
    from kvcomm.plan.fitted import fit_weights, project_simplex

    w = project_simplex(torch.tensor([[0.5, 0.5, 0.5], [2.0, -1.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([[1 / 3] * 3, [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    anchors = [torch.randn(4, 2, 10, 8, generator=g) for _ in range(4)]
    content = 0.3 * anchors[0] + 0.7 * anchors[1]
    got = fit_weights(content, anchors, "aligned", ridge=1e-8)
    assert got.shape == (4, 4) and torch.allclose(got.sum(0), torch.ones(4))
    assert torch.allclose(got[:2], torch.tensor([[0.3], [0.7]]).expand(2, 4), atol=1e-3)


def test_fitted_estimate_is_exact_for_a_content_the_pool_recorded(tiny):
    """A content that is an anchor's own: the fitted weights pick that anchor, whose deltas
    were recorded for this agent on this prompt, so the estimate is the dense KV (the
    softmax weights of section 5 spread over the other anchors too)."""
    from kvcomm.plan.fitted import FittedEstimator

    model, tok = tiny("llama")
    fit = FittedEstimator("aligned", ridge=0.0)
    est = {"fit": fit, "anchors": "anchors"}
    err = {}
    for name in est:
        # head sharing off: every warm-up content becomes an anchor in both pools (the
        # estimators' weights are compared on the same anchors)
        eng = make(model, tok, estimator=est[name], head_share=0.0)
        for i in range(4):
            one(eng, i)
        c = one(eng, 0)   # the shortest question and context: every slot has 3-4 candidates
        assert c.path == "reuse" and len(c.slot_anchors["user_question"]) >= 3, c.reason
        d = one(eng, 0, mode="dense")
        (k, v), (dk, dv) = kv(c), kv(d)
        err[name] = max(maxdiff(k[:, :, :-1], dk[:, :, :-1]), maxdiff(v[:, :, :-1], dv[:, :, :-1]))
    assert err["fit"] < ATOL < err["anchors"]


def test_anchors_or_base_estimates_what_the_anchors_cannot_from_the_moved_base(tiny):
    """Cold, `anchors-or-base` computes and learns as `anchors` does; once the slot's pool holds
    min_anchors anchors with the agent's deltas, a slot longer than every anchor (a new
    anchor) is computed by `anchors` (a partial call) and written as its moved base by
    `anchors-or-base` (the call stays on the reuse path); a slot the anchors can estimate
    gets the same KV from both."""
    model, tok = tiny("llama")
    got = {}
    for name in ("anchors", "anchors-or-base"):
        eng = make(model, tok, estimator=name)
        warm = [one(eng, i) for i in (0, 3)]   # the shortest contents: a later, longer question has too few candidates
        assert [w.path for w in warm] == ["dense", "dense"], "cold: computed, deltas recorded"
        eng.new_request()
        got[name] = eng.call("a", {"user_question": QUESTIONS[2], "condition_tool_current": CONTEXTS[0]},
                             max_new_tokens=1, keep_cache=True)
        got[name + "/engine"] = eng
    a, b = got["anchors"], got["anchors-or-base"]
    assert a.path == "partial" and "user_question" in a.reason and a.computed_tokens > 1
    assert b.path == "reuse" and b.computed_tokens == 1 and "moved base" in b.slot_decisions["user_question"]
    (ka, va), (kb, vb) = kv(a), kv(b)
    _, q0, q1 = b.layout.spans[0]
    content = got["anchors-or-base/engine"].request.contents[("user_question", tuple(b.layout.ids[q0:q1]))]
    assert torch.equal(vb[:, :, q0:q1], content.base_v)
    _, c0, c1 = b.layout.spans[1]
    assert b.slot_anchors["condition_tool_current"] == a.slot_anchors["condition_tool_current"]
    assert maxdiff(va[:, :, c0:c1], vb[:, :, c0:c1]) < 1e-6
