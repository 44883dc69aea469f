"""The connector's scheduler half and the server's front end load none of the model-side
code: not transformers' cache classes through kvcomm, not the engine, not the worker half
(they run in vLLM's engine-core and API processes, which hold no model)."""
import subprocess
import sys

CODE = """
import sys
import vllm.distributed.kv_transfer.kv_connector.v1.base   # what vLLM itself loads there
before = set(sys.modules)
import kvcomm.vllm.connector, kvcomm.vllm.scheduler_side, kvcomm.vllm.frontend, kvcomm.vllm.jobs
print("\\n".join(sorted(set(sys.modules) - before)))
"""

MODEL_SIDE = ("kvcomm.hf", "kvcomm.engine", "kvcomm.models", "kvcomm.vllm.worker_side", "kvcomm.vllm.worker_state",
              "kvcomm.vllm.paged", "kvcomm.vllm.model_info", "transformers.cache_utils", "transformers.models")


def test_scheduler_side_and_front_end_load_no_model_code():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.split()
    assert "kvcomm.vllm.scheduler_side" in loaded and "kvcomm.plan.planner" in loaded
    bad = [m for m in loaded if m.startswith(MODEL_SIDE)]
    assert not bad, bad
