"""The client's dense mode is plain vLLM, the baseline: no KVCOMM parameters, and a cache_salt
of its own, so the server's chat inference leaves it alone (nothing of it is remembered or
encoded ahead to run beside the requests after it) and its prefix cache never holds KV that
KVCOMM computed."""
from kvcomm.vllm.chat_front import ChatFront
from kvcomm.vllm.client import BASELINE_SALT, DENSE, KVCOMM, KVCommClient


def test_a_dense_call_is_plain_vllm_in_a_prefix_cache_of_its_own():
    client = KVCommClient("http://127.0.0.1:1", model="m")   # no request is sent
    client.add_agent("checker", "You check.", "Report:\n{user_question}\nCheck it.")
    dense = client.chat_body("checker", {"user_question": "Shop A sold 12 apples."}, mode=DENSE)
    kv = client.chat_body("checker", {"user_question": "Shop A sold 12 apples."}, mode=KVCOMM)
    assert "kv_transfer_params" not in dense and dense["cache_salt"] == BASELINE_SALT
    assert "cache_salt" not in kv and "kvcomm" in kv["kv_transfer_params"]
    assert dense["messages"] == kv["messages"]
    front = ChatFront(tokenizer=None, specials=())
    assert not front.applies(dense)                                   # not taken as chat traffic
    assert front.applies({k: v for k, v in dense.items() if k != "cache_salt"})
    own = client.chat_body("checker", {"user_question": "x"}, mode=DENSE, cache_salt="mine")
    assert own["cache_salt"] == "mine"                                # a caller's salt is kept
