"""Exactness of the engine: where KVCOMM must be exact, it is.

(a) layer 0 of the reuse-path KV equals the dense KV (keys only move; layer 0 has
    no context to correct for) - deeper layers are estimated and do differ;
(b) an agent called again with content identical to an anchor it recorded, at the
    same positions, gets reuse-path KV equal to the dense KV and the same first token;
(c) when a slot moves (an earlier placeholder got longer), its key deltas move with
    it: exactly when nothing but the position changed, and with an estimate error
    vs dense no worse than at the original position when the context changed too;
(d) the agent's exact prefix S0 equals a fresh dense computation on both paths.

The pools here use tau = 1e-3 so decisions and weights are one-hot on the nearest
anchor (with the default tau = 1 an identical anchor would be blended with the
others, and (b) would only be approximate by design).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import DynamicCache

import kvcomm
from kvcomm import ops
from kvcomm.engine import KVCommEngine

from conftest import ARCHS

ONE_SLOT = "Question:\n{user_question}\nAnswer it briefly."
TWO_SLOTS = "Context:\n{condition_tool_current}\nQuestion:\n{user_question}\nAnswer it."
SYSTEM = "You are a careful assistant."

# Warm-up questions are longer than the ones asked later: an anchor is a candidate
# only for content no longer than itself (docs/method.md, "Deciding").
LONG_QUESTIONS = ["How many legs do three cats and two birds have together, in total?",
                  "Which of the planets in our solar system has the most moons right now?"]
SHORT_QUESTION = "What is five plus nine, exactly?"

# Exactness tolerances (max abs diff on KV): float32 rounding of RoPE moves.
F32_ATOL = 1e-4


def make_engine(model, tok, template=ONE_SLOT, tau=1e-3):
    spec = kvcomm.hf.inspect_model(model)
    cfg = kvcomm.PoolConfig(tau=tau, layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim)
    eng = KVCommEngine(model, tok, pool_config=cfg)
    eng.add_agent("a", SYSTEM, template)
    return eng


def run(eng, inputs, mode="kvcomm", new_request=True):
    """One call with 1 new token; returns (call, K, V) of the prompt's T tokens (the call
    keeps its cache and layout: call.cache, call.layout)."""
    if new_request:
        eng.new_request()
    call = eng.call("a", inputs, mode=mode, max_new_tokens=1, return_first_logits=True, keep_cache=True)
    T = call.layout.length
    k, v = call.cache.span(0, T)
    return call, k.clone(), v.clone()


def fresh_kv(model, ids):
    """K, V [L,H,T,D] of `ids` from a plain transformers forward (DynamicCache)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([list(ids)], device=model.device), past_key_values=cache, use_cache=True)
    k = torch.stack([layer.keys[0] for layer in cache.layers])
    v = torch.stack([layer.values[0] for layer in cache.layers])
    return k, v


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def warm(eng, questions=LONG_QUESTIONS):
    for q in questions:
        call, _, _ = run(eng, {"user_question": q})
        assert call.path == "dense"  # cold pool: the first two contents become anchors


# ------------------------------------------------------------------ (a) + (d)


def check_layer0_and_prefix(model, tok):
    eng = make_engine(model, tok)
    warm(eng)
    inputs = {"user_question": SHORT_QUESTION}
    reuse, rk, rv = run(eng, inputs)
    assert reuse.path == "reuse", reuse.reason
    lay = reuse.layout
    dense, dk, dv = run(eng, inputs, mode="dense", new_request=False)
    assert dense.path == "dense" and dk.shape == rk.shape
    T = lay.length
    # (a) layer 0: moved base of the slot, moved template of the segments, exact S0.
    assert max_diff(rk[0], dk[0]) < F32_ATOL
    assert max_diff(rv[0], dv[0]) < F32_ATOL
    # Deeper layers of the slot are estimated: they must differ (else this test could
    # not tell an exact layer 0 from a dense prefill in disguise).
    _, a, b = lay.spans[0]
    assert rel_err(rv[1:, :, a:b], dv[1:, :, a:b]) > 1e-3
    # (d) exact S0 on both paths, against a fresh dense computation of S0 alone.
    st = eng.agents["a"]
    s0 = st.s0
    assert s0 == a and s0 > 0
    fk, fv = fresh_kv(model, lay.ids[:s0])
    for k, v in ((rk, rv), (dk, dv)):
        assert max_diff(k[:, :, :s0], fk) < F32_ATOL and max_diff(v[:, :, :s0], fv) < F32_ATOL
    # The reuse path copied the agent's stored S0 (it did not recompute it) ...
    assert torch.equal(rk[:, :, :s0], st.s0_k) and torch.equal(rv[:, :, :s0], st.s0_v)
    # ... and so does the kvcomm dense path (a new question becomes an anchor).
    # (longer than every anchor, so no candidate: a new anchor, dense path; head sharing off,
    # or the anchors' length would be shared as the question's head)
    eng.planner.settings = dataclasses.replace(eng.planner.settings, head_share=0.0)
    call, ck, cv = run(eng, {"user_question": "Why is the sea salty, and why are the rivers that flow into "
                                              "it not salty at all?"})
    assert call.path == "dense" and "new anchor" in call.slot_decisions["user_question"]
    assert torch.equal(ck[:, :, :s0], st.s0_k) and torch.equal(cv[:, :, :s0], st.s0_v)
    fk, fv = fresh_kv(model, call.layout.ids)
    assert max_diff(ck, fk) < F32_ATOL and max_diff(cv, fv) < F32_ATOL
    assert T == reuse.prompt_tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_layer0_and_prefix_exact_tiny(tiny, arch):
    check_layer0_and_prefix(*tiny(arch))


def test_layer0_and_prefix_exact_smollm2(smollm2):
    check_layer0_and_prefix(*smollm2)


# ------------------------------------------------------------------ (b)


def check_identical_anchor(model, tok, atol=F32_ATOL, first_logits_atol=1e-3):
    eng = make_engine(model, tok, TWO_SLOTS)
    inputs = [{"condition_tool_current": "The shop sells red apples and green pears.",
               "user_question": "How many apples are left now?"},
              {"condition_tool_current": "A farmer grows ripe pears, plums and a few melons.",
               "user_question": "Which fruit does the farmer grow the most of?"}]
    for x in inputs:
        call, _, _ = run(eng, x)
        assert call.path == "dense"
    target = inputs[0]
    reuse, rk, rv = run(eng, target)
    assert reuse.path == "reuse", reuse.reason
    assert set(reuse.slot_decisions) == {"condition_tool_current", "user_question"}
    dense, dk, dv = run(eng, target, mode="dense", new_request=False)
    # Every layer, every token of the prompt (slots, segments, S0 and the last token).
    assert max_diff(rk, dk) < atol, [max_diff(rk[i], dk[i]) for i in range(rk.shape[0])]
    assert max_diff(rv, dv) < atol
    assert reuse.first_token_id == dense.first_token_id
    assert max_diff(reuse.first_logits, dense.first_logits) < first_logits_atol
    return dense


@pytest.mark.parametrize("arch", ARCHS)
def test_identical_content_reuse_equals_dense_tiny(tiny, arch):
    check_identical_anchor(*tiny(arch))


def test_identical_content_reuse_equals_dense_bf16(tiny):
    # bf16: the deltas are bf16 differences, so "exact" means within bf16 rounding.
    model, tok = tiny("qwen3", dtype=torch.bfloat16)
    check_identical_anchor(model, tok, atol=0.1, first_logits_atol=0.15)


def test_identical_content_reuse_equals_dense_smollm2(smollm2):
    check_identical_anchor(*smollm2, atol=2e-3, first_logits_atol=2e-3)


def test_blended_anchors_are_not_exact(tiny):
    # The counter-check for (b): with the default tau = 1 the decision (on raw
    # Frobenius distances, large) is still one-hot on the identical anchor, but the
    # per-token weights (on mean |diff|, small) blend in the other anchor, and the
    # KV is then visibly off: (b) passing above is down to the one-hot weights.
    model, tok = tiny("llama")
    eng = make_engine(model, tok, TWO_SLOTS, tau=1.0)
    inputs = [{"condition_tool_current": "The shop sells red apples and green pears.",
               "user_question": "How many apples are left now?"},
              {"condition_tool_current": "A farmer grows ripe pears, plums and a few melons.",
               "user_question": "Which fruit does the farmer grow the most of?"}]
    for x in inputs:
        run(eng, x)
    reuse, rk, _ = run(eng, inputs[0])
    assert reuse.path == "reuse", reuse.reason
    _, dk, _ = run(eng, inputs[0], mode="dense", new_request=False)
    assert max_diff(rk, dk) > 1e-2


# ------------------------------------------------------------------ (c)

MOVE_Q = "How many apples are left now?"
COND_ANCHOR = "The shop sells red apples."
# Same token count as the anchor's context in both the tiny and the SmolLM2
# tokenizer (the slot stays put) ...
COND_SAME_LENGTH = ["A farmer grows ripe pears.", "Our team wins many prizes.", "The girl buys fresh pears."]
# ... and the same sentences made longer (the slot moves right).
COND_LONGER = ["A farmer grows ripe pears and sells them at noon.",
               "Our team wins many prizes and trains on Sundays.",
               "The girl buys fresh pears and a loaf of bread."]
# An estimate at a moved slot may be this much worse than at the original position:
# the longer contexts add tokens the anchor never saw, so the content's context
# changes more than with the same-length ones - a context effect, not a position one.
MOVE_TOLERANCE = 1.5


class MovedSlot:
    """An engine with one recorded anchor for {user_question} (context COND_ANCHOR),
    and helpers to estimate the slot at any position and to get dense truth."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.eng = make_engine(model, tok, TWO_SLOTS)
        self.spec = self.eng.spec
        self.st = self.eng.agents["a"]
        call, self.k0, self.v0 = run(self.eng, self.inputs(COND_ANCHOR))
        assert call.path == "dense"
        lay = call.layout
        _, self.a0, self.b0 = lay.spans[1]
        self.sa0, self.sb0 = lay.segments[1]
        self.content = self.eng.request.contents[("user_question", lay.span_ids(1))]
        assert self.content.anchor_id is not None
        self.deltas = self.eng.pool.anchor_deltas("user_question", self.content.anchor_id, self.st.key)

    @staticmethod
    def inputs(cond):
        return {"condition_tool_current": cond, "user_question": MOVE_Q}

    def estimate(self, position, seg_position):
        s = self.spec
        n, S = self.b0 - self.a0, self.sb0 - self.sa0
        dk = torch.zeros(s.num_layers, s.kv_heads, n, s.head_dim, dtype=s.dtype, device=s.device)
        gk = torch.zeros(s.num_layers, s.kv_heads, S, s.head_dim, dtype=s.dtype, device=s.device)
        dv, gv = torch.zeros_like(dk), torch.zeros_like(gk)
        res = self.eng.pool.estimate("user_question", self.st.key, self.content.base_k, self.content.base_v,
                                     s.inv_freq, position, dk, dv, seg_template_k=self.st.seg_k[1],
                                     seg_template_v=self.st.seg_v[1], seg_position=seg_position,
                                     seg_dst_k=gk, seg_dst_v=gv)
        assert list(res.anchors) == [self.content.anchor_id]
        return dk, dv, gk, gv

    def unrotated_keys(self, position):
        """The reference implementation's slot keys: base moved, key deltas left at the
        anchor's absolute positions (docs/method.md, "Keys move exactly")."""
        inv = self.spec.inv_freq
        k = ops.rope_move(self.content.base_k, inv, position)
        k[1:] += ops.rope_move(self.deltas["ph_k"], inv, self.a0)[1:]
        return k

    def dense(self, cond):
        call, k, v = run(self.eng, self.inputs(cond), mode="dense", new_request=False)
        lay = call.layout
        _, a, b = lay.spans[1]
        sa, sb = lay.segments[1]
        assert (b - a, sb - sa) == (self.b0 - self.a0, self.sb0 - self.sa0)
        return a, sa, (k[:, :, a:b], v[:, :, a:b], k[:, :, sa:sb], v[:, :, sa:sb])


@pytest.mark.parametrize("arch", ARCHS)
def test_moved_slot_key_deltas_move_exactly(tiny, arch):
    check_moved_slot_exact(*tiny(arch))


def check_moved_slot_exact(model, tok):
    """Only the position changes: the estimate at p + s must be the real KV at p
    moved by s (keys rotated, values unchanged), for the slot and its segment."""
    m = MovedSlot(model, tok)
    inv = m.spec.inv_freq
    real = (m.k0[:, :, m.a0:m.b0], m.v0[:, :, m.a0:m.b0], m.k0[:, :, m.sa0:m.sb0], m.v0[:, :, m.sa0:m.sb0])
    for shift in (0, 7, 150):
        ek, ev, gk, gv = m.estimate(m.a0 + shift, m.sa0 + shift)
        assert max_diff(ek, ops.rope_move(real[0], inv, shift)) < F32_ATOL
        assert max_diff(ev, real[1]) < F32_ATOL
        assert max_diff(gk, ops.rope_move(real[2], inv, shift)) < F32_ATOL
        assert max_diff(gv, real[3]) < F32_ATOL
        if shift:  # deltas left unrotated (the reference's behaviour) are visibly wrong
            bad = m.unrotated_keys(m.a0 + shift)
            assert max_diff(bad[1:], ops.rope_move(real[0], inv, shift)[1:]) > 1e-2


def check_moved_slot_vs_dense(model, tok, tolerance=MOVE_TOLERANCE, unrotated_margin=None):
    m = MovedSlot(model, tok)

    def errors(conds):
        ours, unrot, shifts = [], [], []
        for cond in conds:
            a, sa, (k, v, sk, sv) = m.dense(cond)
            ek, ev, gk, gv = m.estimate(a, sa)
            # Layers >= 1 carry the estimate (layer 0 is exact, see test (a)).
            ours.append(sum(rel_err(x[1:], y[1:]) for x, y in ((ek, k), (ev, v), (gk, sk), (gv, sv))) / 4)
            unrot.append(rel_err(m.unrotated_keys(a)[1:], k[1:]))
            shifts.append(a - m.a0)
        return sum(ours) / len(ours), sum(unrot) / len(unrot), shifts

    at_orig, _, shifts = errors(COND_SAME_LENGTH)
    assert shifts == [0] * len(COND_SAME_LENGTH)
    moved, moved_unrot, shifts = errors(COND_LONGER)
    assert all(s > 0 for s in shifts)
    assert moved <= tolerance * at_orig, (moved, at_orig)
    if unrotated_margin is not None:
        ek_err = []
        for cond in COND_LONGER:
            a, sa, (k, *_) = m.dense(cond)
            ek_err.append(rel_err(m.estimate(a, sa)[0][1:], k[1:]))
        assert moved_unrot > unrotated_margin * sum(ek_err) / len(ek_err), (moved_unrot, ek_err)
    return moved, at_orig, moved_unrot


@pytest.mark.parametrize("arch", ARCHS)
def test_moved_slot_estimate_no_worse_than_at_original_position_tiny(tiny, arch):
    check_moved_slot_vs_dense(*tiny(arch), unrotated_margin=1.3)


def test_moved_slot_estimate_no_worse_than_at_original_position_smollm2(smollm2):
    check_moved_slot_vs_dense(*smollm2)


# ------------------------------------------------------------------ bigger variants on SmolLM2


def test_moved_slot_far_smollm2(smollm2):
    """SmolLM2 with a slot moved by dozens of tokens: ours stays near the unmoved
    error, deltas left unrotated are worse. (Less so than in the tiny models: with
    rope_theta 1e5 most of SmolLM2's channel pairs barely turn over a few dozen
    positions, so only the fast channels of an unrotated delta point the wrong way.)"""
    model, tok = smollm2
    m = MovedSlot(model, tok)
    padding = " The weather was fine, the roads were empty and nobody was in a hurry that day."
    errs = {}
    for label, conds in (("orig", COND_SAME_LENGTH), ("moved", [c + padding for c in COND_SAME_LENGTH])):
        ours, unrot = [], []
        for cond in conds:
            a, sa, (k, v, sk, sv) = m.dense(cond)
            ek = m.estimate(a, sa)[0]
            ours.append(rel_err(ek[1:], k[1:]))
            unrot.append(rel_err(m.unrotated_keys(a)[1:], k[1:]))
            assert (a - m.a0 > 15) == (label == "moved")
        errs[label] = (sum(ours) / len(ours), sum(unrot) / len(unrot))
    assert errs["moved"][0] <= MOVE_TOLERANCE * errs["orig"][0], errs
    assert errs["moved"][1] > 1.1 * errs["moved"][0], errs


def test_reply_slot_layer0_exact_smollm2(smollm2):
    """A downstream agent reusing a captured reply (base cut from the sender's
    cache): layer 0 still equals dense, and the S0 is exact."""
    model, tok = smollm2
    eng = make_engine(model, tok)
    eng.add_agent("b", SYSTEM, "Question:\n{user_question}\nAnswer given:\n{agent_a_current}\nIs it right?")
    questions = ["What is two plus three?", "What is ten minus four?", "What is six times seven?",
                 "What is nine plus eight?", "What is twelve minus five?", "What is three times four?",
                 "What is eight plus six?", "What is fifteen minus nine?"]
    for q in questions:
        eng.new_request()
        a = eng.call("a", {"user_question": q}, max_new_tokens=6)
        inputs = {"user_question": q, "agent_a_current": a.text}
        b = eng.call("b", inputs, max_new_tokens=1, keep_cache=True)
        if b.path != "reuse":
            continue
        reply = eng.request.current["a"]
        assert eng.request.contents[("agent_a_current", reply.ids)].source == "reply"
        T = b.layout.length
        rk, rv = (t[:, :, :T].clone() for t in b.cache.span(0, T))
        dense = eng.call("b", inputs, mode="dense", max_new_tokens=1, keep_cache=True)
        dk, dv = dense.cache.span(0, T)
        assert max_diff(rk[0], dk[0]) < F32_ATOL and max_diff(rv[0], dv[0]) < F32_ATOL
        s0 = eng.agents["b"].s0
        assert max_diff(rk[:, :, :s0], dk[:, :, :s0]) < F32_ATOL
        return
    pytest.fail("agent b never took the reuse path")


# ------------------------------------------------------------------ (e) exact_tail


def _tail_engine(model, tok, tail):
    # tau = 1: blended anchors, so the estimated KV is visibly not dense (see above).
    eng = make_engine(model, tok, TWO_SLOTS, tau=1.0)
    eng.exact_tail = tail
    for x in ({"condition_tool_current": "The shop sells red apples and green pears.",
               "user_question": "How many apples are left now?"},
              {"condition_tool_current": "A farmer grows ripe pears, plums and a few melons.",
               "user_question": "Which fruit does the farmer grow the most of?"}):
        run(eng, x)
    return eng


TAIL_TARGET = {"condition_tool_current": "The shop sells red apples and green pears.",
               "user_question": "How many apples are left now?"}


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_tail_recomputes_the_last_tokens(tiny, arch):
    """exact_tail=k: the reuse path's last k prompt tokens hold KV computed by the model
    over the estimated rest (not estimates); everything before them is the estimate."""
    model, tok = tiny(arch)
    k_tail = 5
    one = _tail_engine(model, tok, 1)
    r1, k1, v1 = run(one, TAIL_TARGET)
    eng = _tail_engine(model, tok, k_tail)
    rk_call, rk, rv = run(eng, TAIL_TARGET)
    assert r1.path == rk_call.path == "reuse"
    T = rk_call.layout.length
    head = T - k_tail
    # Same pools, same decisions: identical estimates before the tail ...
    assert torch.equal(rk[:, :, :head], k1[:, :, :head]) and torch.equal(rv[:, :, :head], v1[:, :, :head])
    # ... and the tail is the model's own forward over that estimated head.
    cache = kvcomm.hf.KVBufferCache.for_spec(eng.spec, T + 2)
    cache.k[:, :, :head].copy_(rk[:, :, :head])
    cache.v[:, :, :head].copy_(rv[:, :, :head])
    cache.set_length(head)
    from kvcomm.engine.kv import forward
    with torch.inference_mode():
        logits = forward(model, cache, rk_call.layout.ids[head:])
    tk, tv = cache.span(head, T)
    assert max_diff(rk[:, :, head:], tk) < F32_ATOL and max_diff(rv[:, :, head:], tv) < F32_ATOL
    assert max_diff(rk_call.first_logits, logits) < 1e-4
    # The tail really changed: the estimated tail KV (exact_tail=1) differs from it.
    assert max_diff(k1[1:, :, head:T - 1], rk[1:, :, head:T - 1]) > 1e-3


def test_exact_tail_covering_everything_after_s0_equals_dense(tiny):
    model, tok = tiny("llama")
    eng = _tail_engine(model, tok, 10_000)
    reuse, rk, rv = run(eng, TAIL_TARGET)
    assert reuse.path == "reuse"
    dense, dk, dv = run(eng, TAIL_TARGET, mode="dense", new_request=False)
    assert max_diff(rk, dk) < F32_ATOL and max_diff(rv, dv) < F32_ATOL
    assert reuse.first_token_id == dense.first_token_id
    assert max_diff(reuse.first_logits, dense.first_logits) < 1e-4


@pytest.mark.parametrize("bad", [0, -3, True, 1.5, "4"])   # None: not given (the policy's tail)
def test_exact_tail_must_be_a_positive_int(tiny, bad):
    model, tok = tiny("llama")
    with pytest.raises(ValueError, match="exact_tail must be an int >= 1"):
        KVCommEngine(model, tok, exact_tail=bad)


# ------------------------------------------------------------------ the same on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the engine did not run on a GPU")


def on_cuda(model):
    """A GPU copy (the tiny fixture's CPU model is cached and shared)."""
    return copy.deepcopy(model).cuda()


@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_exactness_on_cuda(tiny, arch):
    """(a)-(d) with the model, the pool's tensors and every op on the GPU."""
    model, tok = tiny(arch)
    model = on_cuda(model)
    check_layer0_and_prefix(model, tok)
    dense = check_identical_anchor(model, tok)
    assert dense.cache.k.is_cuda
    check_moved_slot_exact(model, tok)
    check_moved_slot_vs_dense(model, tok, unrotated_margin=1.3)


@needs_cuda
def test_engine_exactness_on_cuda_bf16(tiny):
    model, tok = tiny("qwen3", dtype=torch.bfloat16)
    check_identical_anchor(on_cuda(model), tok, atol=0.1, first_logits_atol=0.15)
