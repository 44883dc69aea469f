"""kvcomm_app: the application built on the kvcomm library.

    runtime/   multi-agent graphs on the engine: agents, topologies, tools, workloads,
               metrics, the dense-vs-KVCOMM comparison (`kvcomm demo` / `kvcomm eval`)
    bench/     benchmarks: TTFT in the paper's setting, the gamma x capacity sweep, and
               the logic of the scripts under benchmarks/
    cli.py     the `kvcomm` command

It depends on the library (`kvcomm`: ops, hf, engine); the library never imports it.
"""
