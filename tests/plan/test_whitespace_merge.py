"""A content ending in whitespace that merges with the template's following text into one
token (a reply ending in "\\n" before the template's "\\n\\n") goes with the segment: the span
stays clean, the segment matches the template but for that token, and every call recomputes
it - instead of the whole call falling back to dense."""
from types import SimpleNamespace

import pytest
import torch

from kvcomm import AnchorPool, PoolConfig
from kvcomm.plan import PlanSettings, Planner, Session, agent_from_template_kv
from kvcomm.plan.template import chat_frame, fill, markers, parse_template, render_layout

TEMPLATE = "Question:\n{user_question}\nAnswer:\n{agent_a_current}\n\nIs it right?"


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def layouts(tok, reply):
    frame = chat_frame(tok, "You check.")
    t = parse_template(TEMPLATE)
    mu, ms = fill(t, markers(t))
    text, spans = fill(t, {"user_question": "What is 6 times 7?", "agent_a_current": reply})
    return t, render_layout(tok, frame, mu, ms), render_layout(tok, frame, text, spans)


@pytest.mark.parametrize("reply", ["42\n", "42 ", "42\n\n", "It is 42.\n "])
def test_trailing_whitespace_goes_with_the_segment(tok, reply):
    t, tl, lay = layouts(tok, reply)
    assert lay.problem is None and len(lay.merged) == 1
    (m,) = lay.merged
    name, a, b = lay.spans[1]
    assert m == b == lay.segments[1][0]                      # the segment's first token
    inside = tok.decode(lay.ids[a:b])                          # the content, less the merged whitespace
    assert reply.startswith(inside) and inside.rstrip() == reply.rstrip() and inside != reply
    assert tok.decode([lay.ids[m]]).strip() == ""
    n, inv_freq = tl.length, 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    state = agent_from_template_kv("b", "b@x", "You check.", t, tl, torch.zeros(1, 1, n, 8), torch.zeros(1, 1, n, 8),
                                   inv_freq)
    assert state.alignment_problem(lay) is None


def test_other_merges_are_still_a_problem(tok):
    _, _, lay = layouts(tok, "42abc")
    assert lay.problem is None and lay.merged == []
    # Leading whitespace merging with the template's newline before the slot is not moved.
    _, _, lay = layouts(tok, "\n\n42")
    assert lay.problem is not None and "spans the start of the content" in lay.problem


def test_the_merged_token_is_always_recomputed(tok):
    t, tl, lay = layouts(tok, "42\n")
    L, H, D = 2, 1, 8
    rope = SimpleNamespace(inv_freq=1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), exact_positions=None,
                           rope_type="default")
    n = tl.length
    agent = agent_from_template_kv("b", "b@x", "", t, tl, torch.randn(L, H, n, D), torch.randn(L, H, n, D),
                                   rope.inv_freq)
    pool = AnchorPool(PoolConfig(min_anchors=2))
    st = Session(index=1)
    for i, (slot, a, b) in enumerate(lay.spans):
        k, v = torch.randn(L, H, b - a, D), torch.randn(L, H, b - a, D)
        st.encoded[("question" if i == 0 else "reply", tuple(lay.ids[a:b]))] = (k, v)
        sa, sb = tl.segments[i]
        for j in range(2):
            aid = pool.add_anchor(slot, k + j, v + j)
            pool.record_deltas(slot, aid, "b@x", torch.randn(L, H, b - a, D), torch.randn(L, H, b - a, D),
                               torch.randn(L, H, sb - sa, D), torch.randn(L, H, sb - sa, D))
    (m,) = lay.merged
    for settings, expect in ((PlanSettings(), [m, lay.length - 1]),
                             (PlanSettings(prefix_only=True), list(range(m, lay.length)))):
        plan = Planner(pool, rope, settings).plan(agent, lay, st, max_new_tokens=4)
        assert plan.path == "reuse" and plan.positions == expect, (plan.reason, plan.positions)
        assert plan.recomputed["merged"] == 1
    # Recording a segment with a merged token learns no offset for that token.
    plan = Planner(pool, rope, PlanSettings(partial=False)).plan(agent, lay, Session(index=2), max_new_tokens=4,
                                                                   encode=lambda kind, ids: (
                                                                       torch.randn(L, H, len(ids), D),
                                                                       torch.randn(L, H, len(ids), D)))
    k, v = torch.randn(L, H, lay.length, D), torch.randn(L, H, lay.length, D)
    Planner(pool, rope).record(plan, k, v)
    c = plan.contents[1]
    if c.anchor_id is not None:
        seg = pool.anchor_deltas("agent_a_current", c.anchor_id, "b@x")["seg_v"]
        assert torch.count_nonzero(seg[:, :, 0]) == 0 and torch.count_nonzero(seg[:, :, 1:]) > 0
