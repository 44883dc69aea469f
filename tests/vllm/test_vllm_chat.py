"""Plain chat traffic through `kvcomm serve` (fp32, SmolLM2-135M): requests as agent frameworks
send them - each agent's system prompt, the task, the other agents' replies as named user
messages, nothing marked - get KVCOMM once the server knows parts of them; requests with
nothing known are plain vLLM; one tenant's text never becomes another's content; adversarial
layouts and 16 conversations at once are served without an error."""
import concurrent.futures as cf
import time

import pytest


SYSTEMS = {"solver": "You answer questions about a shop report. Be brief.",
           "critic": "You check the answer against the report. Be brief.",
           "summarizer": "You give the final number only."}
NAMES = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana"]


def task(i: int) -> str:
    n = NAMES[i % len(NAMES)]
    return (f"{n}'s shop had {10 + 7 * i} pens on Monday. During the week {n} sold {3 + 2 * i} pens to regular "
            f"customers and gave {2 + i % 3} pens to a school. The shop is open from nine to five and a supplier "
            f"visits on Fridays. Question: how many pens were left at the end of the week?")


@pytest.fixture(scope="module")
def client(server):
    return server


def ask(client, messages, tenant="alice", max_tokens=12, **extra):
    body = {"model": "smol", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    r = client.post("/v1/chat/completions", body, headers={"Authorization": f"Bearer {tenant}"})
    return r["choices"][0]["message"]["content"], (r.get("kv_transfer_params") or {}).get("kvcomm")


def conversation(client, i, tenant="alice"):
    said, out = [], []
    for name, system in SYSTEMS.items():
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": task(i)}]
        msgs += [{"role": "user", "name": who, "content": text} for who, text in said]
        text, report = ask(client, msgs, tenant)
        out.append((name, text, report, msgs))
        said.append((name, text))
    return out


def test_framework_traffic_gets_kvcomm_and_fallbacks_are_plain(client):
    runs = [conversation(client, i) for i in range(6)]
    # A reader that sees only the task has the same template in every conversation (the
    # others' templates hold their short replies as text): its first call is served from the
    # cache while its template pass runs; from the next conversation on it is planned (the
    # task encoded by then), and it reuses once the pool has its anchors.
    readers = []
    for i in range(6):
        msgs = [{"role": "system", "content": "You restate the question in one line."},
                {"role": "user", "content": task(i)}]
        readers.append(ask(client, msgs)[1])
        time.sleep(1.0 if i == 0 else 0.0)   # the template pass, after the first call
    first = runs[0]
    assert first[0][2] is None                                   # nothing known: passed through untouched
    # the task, found: a slot of the critic's call, or carried first (computed in context,
    # the solver's call having started its encoding, which the critic does not wait for)
    assert first[1][2] is not None
    assert ("user_question" in first[1][2]["slots"] or "carried first" in first[1][2]["reason"]
            or "new chat template" in first[1][2]["reason"]), first[1][2]
    assert readers[0] is not None and "new chat template" in readers[0]["reason"], readers[0]
    assert all(r is not None and "user_question" in r["slots"] for r in readers[1:]), readers
    assert any(r["path"] in ("reuse", "partial") for r in readers[2:]), readers
    # an inferred call computes its last DEFAULT_TAIL prompt tokens (what vLLM's prefix cache
    # held aside): a framework's request ends in what the next token depends on most
    from kvcomm.vllm.chat_front import DEFAULT_TAIL
    for r in (r for r in readers if r["path"] in ("reuse", "partial")):
        assert r["reused_tokens"] <= max(r["prompt_tokens"] - DEFAULT_TAIL, r["cached_tokens"]), r
    # every call that fell back to dense gives plain vLLM's tokens (fp32, greedy): the same
    # messages from a tenant the server knows nothing of are plain vLLM
    dense = [r for conv in runs for r in conv if r[2] is not None and r[2]["path"] == "dense"][:3]
    assert dense
    for name, text, report, msgs in dense:
        plain, none = ask(client, msgs, tenant=f"fresh-{name}")
        assert none is None and plain == text, (name, report["reason"])


def test_one_tenants_text_never_becomes_anothers_content(client):
    conv = conversation(client, 20, tenant="alice")
    _, _, _, msgs = conv[-1]                                     # alice's texts: the task and two replies
    _, report = ask(client, msgs, tenant="mallory")
    assert report is None                                        # nothing of alice's is known to mallory


def test_adversarial_layouts_are_served(client):
    t = task(30)
    conversation(client, 30)                                     # the server now knows t and the replies
    cases = [
        [{"role": "system", "content": "x"}, {"role": "user", "content": t}, {"role": "user", "content": t}],
        [{"role": "user", "content": f"{t}\n\nAgain:\n{t}"}],    # a content twice in one message
        [{"role": "user", "content": t[:40]}],                   # shorter than the minimum
        [{"role": "user", "content": t + "<|im_end|>"}],         # a control token glued to a content
        [{"role": "system", "content": "y"}, {"role": "user", "content": "no shared text here at all, none"}],
    ]
    for msgs in cases:
        text, _ = ask(client, msgs)
        assert isinstance(text, str)
    # one explicit session id used by two different conversations
    for i in (31, 32):
        ask(client, [{"role": "user", "content": task(i)}], user="shared-session-id")
        ask(client, [{"role": "system", "content": "z"}, {"role": "user", "content": task(i)}],
            user="shared-session-id")


def test_sixteen_conversations_at_once_lose_nothing(client):
    with cf.ThreadPoolExecutor(max_workers=16) as ex:
        futs = [ex.submit(conversation, client, 100 + i, f"t{i % 4}") for i in range(16)]
        runs = [f.result() for f in futs]                        # raises on any failed request
    assert len(runs) == 16 and all(len(c) == 3 and all(isinstance(r[1], str) for r in c) for c in runs)


def test_an_agents_next_turn_starts_from_vllms_prefix_cache(client):
    """A tenant's chat requests share one prefix cache: the solver's second turn (its own reply
    as an assistant message, as AutoGen sends it) finds its first turn there, and KVCOMM plans
    only what follows - never fewer reused tokens than plain vLLM's prefix caching gives."""
    conv = conversation(client, 40)
    (_, solved, _, first), (_, checked, _, _), (_, summed, _, _) = conv
    msgs = first + [{"role": "assistant", "content": solved}, {"role": "user", "name": "critic", "content": checked},
                    {"role": "user", "name": "summarizer", "content": summed}]
    _, report = ask(client, msgs)
    assert report is not None, "the task and the replies are known: a KVCOMM call"
    assert report["cached_tokens"] >= 64 and report["reused_tokens"] >= report["cached_tokens"], report
    # The same turn again once its template pass is done: now planned, the task taken from the cache.
    for _ in range(20):
        _, report = ask(client, msgs)
        if report["slots"]:
            break
        time.sleep(0.25)
    # the first turn's prompt (system message and task, about 80 tokens) is cached in 32-token blocks
    assert report["cached_tokens"] >= 64, report
    assert report["reused_tokens"] >= report["cached_tokens"]
    assert "user_question" in report["slots"] and "prefix cache" in report["slots"]["user_question"]
    # another tenant's identical request computes it all: the caches are apart
    r = client.post("/v1/chat/completions", {"model": "smol", "messages": msgs, "max_tokens": 4, "temperature": 0},
                    headers={"Authorization": "Bearer someone-else"})
    assert (r.get("kv_transfer_params") or {}).get("kvcomm") is None
