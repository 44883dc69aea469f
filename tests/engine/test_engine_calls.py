"""One agent call: decoding after the first token, what the call
reports, dense mode as a pure baseline, the captured reply, and clear errors."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

import kvcomm
from kvcomm import ops
from kvcomm.engine import KVCommEngine, TemplateError

TEMPLATE = "Context:\n{condition_tool_current}\nQuestion:\n{user_question}\nAnswer it."
SYSTEM = "You are a careful assistant."
INPUTS = [{"condition_tool_current": "The shop sells red apples and green pears.",
           "user_question": "How many apples are left now?"},
          {"condition_tool_current": "A farmer grows ripe pears, plums and a few melons.",
           "user_question": "Which fruit does the farmer grow the most of?"}]
TTFT_PARTS = ("encode", "decide", "estimate", "forward", "first_token")


def make_engine(model, tok, tau=1e-3, template=TEMPLATE):
    spec = kvcomm.hf.inspect_model(model)
    cfg = kvcomm.PoolConfig(tau=tau, layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim)
    eng = KVCommEngine(model, tok, pool_config=cfg)
    eng.add_agent("a", SYSTEM, template)
    return eng


def warm_to_reuse(eng, target=INPUTS[0]):
    """Two dense calls make both contents anchors with deltas for agent a; calling
    again with the first inputs then takes the reuse path with exact KV."""
    for x in INPUTS:
        eng.new_request()
        assert eng.call("a", x, max_new_tokens=1).path == "dense"
    eng.new_request()
    return target


def plain_greedy(model, ids, n):
    x = torch.tensor([ids])
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
    return out[0, len(ids):].tolist()


def prompt_ids(eng, inputs):
    return list(eng.call("a", inputs, mode="dense", max_new_tokens=1, keep_cache=True).layout.ids)


# ------------------------------------------------------------------ decoding


def test_dense_greedy_equals_plain_generate(tiny):
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    eng.eos_ids = []  # decode the full length: random weights may say EOS early
    ids = prompt_ids(eng, INPUTS[0])
    call = eng.call("a", INPUTS[0], mode="dense", max_new_tokens=10)
    assert call.new_tokens == 10 == len(call.token_ids)
    assert call.token_ids == plain_greedy(model, ids, 10)
    assert call.first_token_id == call.token_ids[0]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_reuse_greedy_decodes_like_dense(tiny, arch):
    # With content identical to an anchor the reuse-path KV is exact, so greedy
    # decoding after the first token must follow the dense decode token for token.
    model, tok = tiny(arch)
    eng = make_engine(model, tok)
    eng.eos_ids = []
    target = warm_to_reuse(eng)
    reuse = eng.call("a", target, max_new_tokens=10)
    assert reuse.path == "reuse", reuse.reason
    dense = eng.call("a", target, mode="dense", max_new_tokens=10)
    assert reuse.new_tokens == 10
    assert reuse.token_ids == dense.token_ids
    assert reuse.text == dense.text


def _sample(eng, inputs, seed, mode="kvcomm", temperature=1.0, n=12):
    torch.manual_seed(seed)
    return eng.call("a", inputs, mode=mode, max_new_tokens=n, do_sample=True, temperature=temperature)


@pytest.mark.parametrize("mode", ["dense", "kvcomm"])
def test_sampling_decodes_after_the_first_token(tiny, mode):
    model, tok = tiny("mistral")
    eng = make_engine(model, tok)
    eng.eos_ids = []
    target = warm_to_reuse(eng)
    runs = {}
    for seed in (1, 2, 3):
        if mode == "kvcomm":
            eng.new_request()
        call = _sample(eng, target, seed, mode)
        assert call.path == ("reuse" if mode == "kvcomm" else "dense"), call.reason
        assert call.new_tokens == 12 == len(call.token_ids)
        runs[seed] = call.token_ids
    # Sampling is random (seeds differ somewhere) ...
    assert len({tuple(t) for t in runs.values()}) > 1
    # ... and reproducible under the same seed.
    if mode == "kvcomm":
        eng.new_request()
    assert _sample(eng, target, 2, mode).token_ids == runs[2]
    # A near-zero temperature reaches generate too: sampling becomes greedy.
    if mode == "kvcomm":
        eng.new_request()
    cold = _sample(eng, target, 5, mode, temperature=1e-4)
    if mode == "kvcomm":
        eng.new_request()
    greedy = eng.call("a", target, mode=mode, max_new_tokens=12)
    assert cold.token_ids == greedy.token_ids


# ------------------------------------------------------------------ what a call reports


def test_call_reports_path_reason_and_timings(tiny):
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    eng.new_request()
    first = eng.call("a", INPUTS[0], max_new_tokens=4)
    assert first.path == "dense" and first.mode == "kvcomm"
    assert first.reason.startswith("slot condition_tool_current: too_few_candidates")
    assert first.slot_decisions == {"condition_tool_current": "too_few_candidates (new anchor)",
                                    "user_question": "too_few_candidates (new anchor)"}
    eng.new_request()
    eng.call("a", INPUTS[1], max_new_tokens=1)
    eng.new_request()
    reuse = eng.call("a", INPUTS[0], max_new_tokens=4)
    assert reuse.path == "reuse" and reuse.reason == "all slots shared"
    assert all(d.startswith("share (estimated from anchors [") for d in reuse.slot_decisions.values())
    # the decision's numbers: none to compare on the cold call, two anchors on the shared one
    assert set(first.slot_gates) == set(reuse.slot_gates) == set(first.slot_decisions)
    for slot, g in first.slot_gates.items():
        assert g["candidates"] == 0 and g["nearest"] == [] and g["top_prob"] is None and g["tokens"] > 0
    for slot, g in reuse.slot_gates.items():
        assert g["candidates"] == 2 and len(g["nearest"]) == 2 and g["nearest"][0] <= g["nearest"][1]
        assert g["entropy"] <= g["threshold"] and 0.5 <= g["top_prob"] <= 1.0
    baseline = eng.call("a", INPUTS[0], mode="dense", max_new_tokens=4)
    assert (baseline.path, baseline.reason, baseline.mode) == ("dense", "baseline", "dense")
    assert baseline.slot_gates == {}
    for call in (first, reuse, baseline):
        t = call.timings
        assert set(TTFT_PARTS) <= set(t) and "total" in t
        assert all(v >= 0 for v in t.values())
        assert call.ttft_ms > 0 and t["forward"] > 0
        # TTFT is everything before the first token: its parts, and no more than the total.
        assert sum(t[k] for k in TTFT_PARTS) <= call.ttft_ms + 1e-3 <= t["total"] + 2e-3
        assert call.prompt_tokens > 20 and call.new_tokens == len(call.token_ids) >= 1
        assert call.first_token_id == call.token_ids[0]
        assert call.first_logits is None  # only on request
        assert call.cache is None and call.layout is None   # likewise
    assert reuse.timings["estimate"] > 0 and reuse.timings["encode"] > 0 and reuse.timings["decide"] > 0
    assert baseline.timings["estimate"] == baseline.timings["decide"] == 0.0
    with_logits = eng.call("a", INPUTS[0], mode="dense", max_new_tokens=1, return_first_logits=True)
    assert with_logits.first_logits.shape == (model.config.vocab_size,)
    assert int(with_logits.first_logits.argmax()) == with_logits.first_token_id
    assert eng.stats()["calls"] == {"reuse": 1, "partial": 0, "dense": 2, "baseline": 2}


def test_keep_cache_returns_the_calls_cache_and_layout(tiny):
    """keep_cache=True: the call's own KV buffer (prompt + fed-back reply tokens) and the
    prompt layout, on both paths."""
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    target = warm_to_reuse(eng)
    for mode, path in (("kvcomm", "reuse"), ("dense", "dense")):
        call = eng.call("a", target, mode=mode, max_new_tokens=3, keep_cache=True)
        assert call.path == path
        assert isinstance(call.cache, kvcomm.hf.KVBufferCache)
        assert call.layout.length == call.prompt_tokens == len(call.layout.ids)
        assert call.cache.length >= call.prompt_tokens
        spec = eng.spec
        assert call.cache.k.shape[:2] == (spec.num_layers, spec.kv_heads)
    assert "cache=" not in repr(call)   # a tensor buffer stays out of the call's repr


class _NoPool:
    """Stands in for the pool: any use is an error."""

    def __getattr__(self, name):
        raise AssertionError(f"dense mode used the pool ({name})")


def test_dense_mode_never_touches_the_pool(tiny):
    model, tok = tiny("qwen3")
    eng = make_engine(model, tok)
    pool = eng.pool
    eng.pool = _NoPool()
    eng.new_request()
    for x in INPUTS:
        call = eng.call("a", x, mode="dense", max_new_tokens=3)
        assert call.path == "dense" and call.reason == "baseline"
        assert call.slot_decisions == {}
    # Nothing was decided, encoded or captured for the request either.
    assert eng.request.contents == {} and eng.request.encoded == {} and eng.request.current == {}
    eng.pool = pool
    assert pool.size() == 0 and pool.slots() == []


# ------------------------------------------------------------------ the captured reply


def test_reply_kv_is_cut_from_the_agents_cache(tiny):
    model, tok = tiny("llama")
    eng = make_engine(model, tok)
    eng.new_request()
    call = eng.call("a", INPUTS[0], max_new_tokens=6, keep_cache=True)
    reply = eng.request.current.get("a")
    if reply is None:
        pytest.skip("the random model's reply was all whitespace/EOS")
    T = call.prompt_tokens
    lo = call.token_ids.index(reply.ids[0])
    assert tuple(call.token_ids[lo:lo + len(reply.ids)]) == reply.ids
    # Dense truth: the prompt and the generated tokens through the model at once.
    seq = list(call.layout.ids) + call.token_ids[:lo + len(reply.ids)]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([seq]), past_key_values=cache)
    k = torch.stack([layer.keys[0] for layer in cache.layers])[:, :, T + lo:]
    v = torch.stack([layer.values[0] for layer in cache.layers])[:, :, T + lo:]
    # Stored position-neutral: moved back to where the reply sat, it is the real KV
    # (the last reply token included, whose KV the decode never computed).
    torch.testing.assert_close(ops.rope_move(reply.k, eng.spec.inv_freq, T + lo), k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reply.v, v, atol=1e-4, rtol=1e-4)
    # And it was decided against its slot's pool (a cold pool: a new anchor).
    content = eng.request.contents[("agent_a_current", reply.ids)]
    assert content.source == "reply" and content.anchor_id is not None


def test_reply_reaches_the_next_agent_as_its_base(smollm2):
    model, tok = smollm2
    eng = make_engine(model, tok)
    eng.add_agent("b", SYSTEM, "Question:\n{user_question}\nAnswer:\n{agent_a_current}\nIs it right?")
    eng.new_request()
    a = eng.call("a", INPUTS[0], max_new_tokens=8)
    assert a.text and a.text == a.text.strip()
    eng.call("b", {"user_question": INPUTS[0]["user_question"], "agent_a_current": a.text}, max_new_tokens=1)
    # b's prompt holds the very tokens a generated, so its base is a's captured KV.
    reply = eng.request.current["a"]
    content = eng.request.contents[("agent_a_current", reply.ids)]
    assert content.source == "reply" and content.base_k is reply.k


def test_a_reply_ending_in_whitespace_does_not_send_the_reader_dense(smollm2):
    """Frameworks pass a reply on as generated, trailing newline included; before the
    template's own newline the two merge into one token. The reader still reuses: that
    token joins the segment after the slot and is recomputed."""
    model, tok = smollm2
    eng = make_engine(model, tok)
    eng.add_agent("b", SYSTEM, "Question:\n{user_question}\nAnswer:\n{agent_a_current}\n\nIs it right?")
    paths = []
    for x in (INPUTS[0], INPUTS[1], INPUTS[0]):
        eng.new_request()
        a = eng.call("a", x, max_new_tokens=8)
        b = eng.call("b", {"user_question": x["user_question"], "agent_a_current": a.text + "\n"}, max_new_tokens=1,
                     keep_cache=True)
        assert b.layout.merged and "boundary" not in b.reason
        paths.append((b.path, dict(b.recomputed)))
    assert paths[-1][0] == "reuse" and paths[-1][1].get("merged") == 1, paths


def test_a_call_without_capture_leaves_the_reply_and_its_slot_alone(smollm2):
    model, tok = smollm2
    eng = make_engine(model, tok)
    eng.new_request()
    first = eng.call("a", INPUTS[0], max_new_tokens=8)
    reply = eng.request.current["a"]
    anchors = [a.id for a in eng.pool.anchors("agent_a_current")]
    contents = dict(eng.request.contents)
    # A re-run (one token, so a different reply) must not replace what downstream
    # agents read, nor send its reply through the slot's decision.
    again = eng.call("a", INPUTS[0], max_new_tokens=1, capture=False)
    assert again.token_ids == first.token_ids[:1]
    assert eng.request.current["a"] is reply
    assert eng.request.contents == contents
    assert [a.id for a in eng.pool.anchors("agent_a_current")] == anchors
    # The default still captures.
    eng.call("a", INPUTS[0], max_new_tokens=1)
    assert eng.request.current["a"] is not reply


# ------------------------------------------------------------------ bad inputs


def test_bad_calls_raise_clear_errors(tiny):
    model, tok = tiny("qwen2")
    eng = make_engine(model, tok)
    good = INPUTS[0]
    with pytest.raises(KeyError, match="unknown agent 'nobody'"):
        eng.call("nobody", good)
    with pytest.raises(TemplateError, match="input\\(s\\) agent_x_current match no placeholder"):
        eng.call("a", {**good, "agent_x_current": "hello"})
    with pytest.raises(TemplateError, match="no input for placeholder\\(s\\) \\{user_question\\}"):
        eng.call("a", {"condition_tool_current": "text"})
    for empty in ("", "  \n "):
        with pytest.raises(TemplateError, match="input \\{user_question\\} is empty"):
            eng.call("a", {**good, "user_question": empty})
    with pytest.raises(TemplateError, match="must be a string, got int"):
        eng.call("a", {**good, "user_question": 7})
    with pytest.raises(ValueError, match="mode must be one of"):
        eng.call("a", good, mode="fast")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        eng.call("a", good, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        eng.call("a", good, do_sample=True, temperature=0.0)
    with pytest.raises(TemplateError, match="unknown placeholder \\{question\\}"):
        eng.add_agent("c", SYSTEM, "Q: {question}")
    with pytest.raises(ValueError, match="already added"):
        eng.add_agent("a", SYSTEM, TEMPLATE)
    with pytest.raises(ValueError, match="agent name 'two words'"):
        eng.add_agent("two words", SYSTEM, TEMPLATE)
    # None of that changed the pool.
    assert eng.pool.size() == 0


def test_prompt_longer_than_the_context_is_refused(tiny):
    model, tok = tiny("llama", max_position_embeddings=192)
    eng = make_engine(model, tok)
    eng.new_request()
    long_question = "Why " * 50
    for mode in ("kvcomm", "dense"):
        with pytest.raises(ValueError, match="exceeds the model's context of 192 positions"):
            eng.call("a", {**INPUTS[0], "user_question": long_question}, mode=mode)
    # A prompt that fits, but not with the requested reply, is refused the same way.
    T = eng.call("a", INPUTS[0], mode="dense", max_new_tokens=1, keep_cache=True).layout.length
    assert T < 192
    with pytest.raises(ValueError, match=f"prompt of {T} tokens \\+ {193 - T} new tokens"):
        eng.call("a", INPUTS[0], max_new_tokens=193 - T)
    assert eng.call("a", INPUTS[0], mode="dense", max_new_tokens=192 - T).new_tokens >= 1
    assert eng.pool.size() == 0


def test_humaneval_prompts_sit_in_their_slot_without_boundary_merges(smollm2):
    """Every HumanEval question, as the code workload formats it, tokenizes inside the
    writer's template without a token across the slot edge (else every call runs dense:
    a 40-question eval reused 0% before the workload stripped the prompts' edge newlines)."""
    pytest.importorskip("kvcomm_app.runtime.datasets")
    from kvcomm.plan.template import fill, render_layout
    from kvcomm_app.runtime.datasets import DataNotInstalled, load_humaneval
    from kvcomm_app.runtime.graph import build_graph
    from kvcomm_app.runtime.topology import make_topology
    from kvcomm_app.runtime.workloads import make_workload

    try:
        problems = load_humaneval()
    except DataNotInstalled as e:
        pytest.skip(str(e))
    model, tok = smollm2
    wl = make_workload("humaneval", 3)
    graph = build_graph(make_topology("fully_connected", 3), wl.roles, wl.decision_role, wl.question_label)
    eng = KVCommEngine(model, tok)
    eng.add_agent("writer", graph.agents[0].role.system_prompt, graph.agents[0].template)
    st = eng.agents["writer"]
    bad = []
    for p in problems:
        text, spans = fill(st.template, {"user_question": wl.format_question(p)}, "writer")
        lay = render_layout(tok, st.frame, text, spans)
        if lay.problem or st.alignment_problem(lay):
            bad.append(p.id)
    assert not bad, f"{len(bad)} of {len(problems)} prompts merge across the slot edge: {bad[:5]}"
