"""Fixtures of the vLLM tests. They run in the vLLM environment that `bash .ci/vllm.sh`
sets up (a CI stage of their own); in an environment without vLLM this folder is not
collected.

Sizes are small on purpose (SmolLM2-135M, short prompts, a few tokens): vLLM on two
shared CPU cores takes seconds per step."""
from __future__ import annotations

import importlib.util
import os

import pytest

from kvcomm_app.bench.vllm_parity import run_reference  # noqa: F401  (used by the tests)

# (this folder is itself named vllm: on sys.path it looks like a namespace package,
# which has no origin; the real vLLM is a regular package)
_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None
collect_ignore_glob = [] if HAVE_VLLM else ["test_*.py"]

# vLLM on CPU: a small KV cache, no OpenMP core binding (the machine's cores are shared;
# a bound thread waits for its one core), the engine in this process for the offline
# tests (so they can read the connector's worker-side state).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

# An explicit KV cache size: without it vLLM's CPU worker refuses to start when less than
# --gpu-memory-utilization (0.92) of the machine's memory is free, which other jobs decide.
KV_BYTES = 1 << 30

# The published method's 2 anchors per slot instead of the default 4, so that the few
# warm-up questions these tests can afford cover the slots (questions of different lengths
# each need anchors at least as long as they are).
SMALL_POOL = {"min_anchors": 2}

SOLVER = ("solver", "You are a careful math tutor.",
          "Solve this problem.\nProblem:\n{user_question}\nReply with the final number only.")
CRITIC = ("critic", "You check answers.",
          "Problem:\n{user_question}\nProposed answer:\n{agent_solver_current}\nIs it correct? Say yes or no.")
WARM = ["What is 12 plus 7?", "A farmer has 3 cows and buys 5 more. How many cows does he have?",
        "What is 9 times 8?", "Tom has 20 apples and eats 4. How many apples are left?", "What is 100 minus 37?",
        "A box holds 6 eggs. How many eggs are in 4 boxes?"]
TEST = ["Sara has 15 pens and gives away 6. How many pens remain?", "What is 7 times 6?"]


@pytest.fixture(scope="session")
def model_dir():
    from kvcomm.models import embedded_model_dir
    return embedded_model_dir()


@pytest.fixture(scope="session")
def offline(model_dir):
    """KVCommLLM (vLLM's LLM with the connector) in this process, fp32, with the
    connector keeping a read-back of every load it writes."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from kvcomm.vllm.offline import KVCommLLM
    eng = KVCommLLM(model_dir, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0, block_size=32,
                    kv_cache_memory_bytes=KV_BYTES, keep_loads=True, pool=SMALL_POOL)
    for a in (SOLVER, CRITIC):
        eng.add_agent(*a)
    return eng


@pytest.fixture(scope="session")
def connector(offline):
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    return get_kv_transfer_group()


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """A KVCOMM server (`python -m kvcomm.vllm.vllm_cli serve` with the connector and the
    front end) on a free loopback port, fp32; stopped by its process id at the end. One for
    the whole run (a start costs a minute here): tests keep to their own agents, texts and
    tenants."""
    from kvcomm.vllm.launch import Server
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    with Server(model_dir, log_path, served_model_name="smol", dtype="float32", max_model_len=1024, pool=SMALL_POOL,
                extra_args=["--enforce-eager", "--block-size", "32", "--uvicorn-log-level", "warning",
                            "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(KV_BYTES)]) as client:
        client.log_path = log_path
        yield client
