"""KVCommEngine.chat on plain chat messages (the way agent frameworks call a model): a request
with nothing known in it runs dense, token for token as without KVCOMM; as conversations
repeat, the agents after the first find the task and the earlier replies and reuse them."""
import kvcomm
from kvcomm.engine import KVCommEngine

SYSTEMS = {"solver": "You answer questions about a shop report. Be brief.",
           "critic": "You check the answer against the report. Be brief.",
           "summarizer": "You give the final number only."}
SHOPS = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fay"]


def task(i: int) -> str:
    n = SHOPS[i % len(SHOPS)]
    return (f"{n}'s shop had {10 + 7 * i} pens on Monday. During the week {n} sold {3 + 2 * i} pens to regular "
            f"customers and gave {2 + i % 3} pens to a school. The shop is open from nine to five and a supplier "
            f"visits on Fridays. Question: how many pens were left at the end of the week?")


def conversation(eng, i, max_new_tokens=16):
    """A round-robin team as frameworks send it: each agent's own system prompt, the task as a
    user message, the other agents' replies as user messages with their names."""
    said, calls = [], []
    for name, system in SYSTEMS.items():
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": task(i)}]
        msgs += [{"role": "user", "name": who, "content": text} for who, text in said]
        calls.append(eng.chat(msgs, max_new_tokens=max_new_tokens))
        said.append((name, calls[-1].text))
    return calls


def test_unknown_messages_run_dense_as_without_kvcomm(smollm2):
    model, tok = smollm2
    eng = KVCommEngine(model, tok)
    msgs = [{"role": "system", "content": SYSTEMS["solver"]}, {"role": "user", "content": task(0)}]
    kv = eng.chat(msgs, max_new_tokens=8)
    dense = eng.chat(msgs, max_new_tokens=8, mode="dense")
    assert kv.path == "dense" and kv.reason == "baseline"       # nothing known: no KVCOMM at all
    assert kv.token_ids == dense.token_ids


def test_repeated_conversations_reuse_the_task_and_the_replies(smollm2):
    model, tok = smollm2
    spec = kvcomm.hf.inspect_model(model)
    eng = KVCommEngine(model, tok, pool_config=kvcomm.PoolConfig(
        min_anchors=2, layers=spec.num_layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim))
    runs = [conversation(eng, i) for i in range(5)]
    first = runs[0]
    assert first[0].path == "dense" and first[0].reason == "baseline"     # the task is new to the engine
    assert "user_question" in first[1].slot_decisions                      # the critic finds the solver's task
    assert any(k.startswith("agent_") and k.endswith("_current") for k in first[2].slot_decisions)
    assert len({c.session for c in first}) == 1                            # one conversation, inferred
    assert len({r[0].session for r in runs}) == 5
    late = [c for r in runs[2:] for c in r[1:]]
    assert any(c.path in ("reuse", "partial") for c in late), [(c.agent, c.path, c.reason) for c in late]
    assert all(c.computed_tokens < c.prompt_tokens for c in late if c.path != "dense")
