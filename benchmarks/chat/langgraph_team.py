"""A 3-agent LangGraph team (a sequential graph solver -> critic -> summarizer over one shared
message list, with a tool node beside the solver) on the tasks of tests/fixtures/chat/tasks.json,
talking to an OpenAI-compatible server.

Runs in the LangGraph client environment (bash .ci/chat_clients.sh langgraph):

    build/venv-langgraph/bin/python benchmarks/chat/langgraph_team.py \\
        --base-url http://127.0.0.1:8100/v1 [--record http://127.0.0.1:8200] [--stream] [--rounds 1]

Each agent node calls langchain-openai's ChatOpenAI (set up as for OpenAI but for base_url)
with its own system message in front of the shared messages, and adds its reply under its
name. On the tool task the solver binds the `lookup` tool with tool_choice naming it until
the tool has run (the common "always look it up first" pattern; a 135M model does not call a
tool on "auto"), so the server needs a tool call parser (vLLM: --tool-call-parser ...;
docs/chat-frameworks.md).

--record: the recording proxy (record_proxy.py) to tell which conversation the next calls
belong to; the framework's traffic goes through --base-url as usual. Prints one JSON line per
conversation (task, seconds, the team's messages) on stdout.
"""
from __future__ import annotations

import json
import sys
import time

from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from common import MODEL, SYSTEM, load_tasks, lookup_function, mark, parser, task_text


def make_lookup(texts: dict) -> StructuredTool:
    return StructuredTool.from_function(lookup_function(texts), name="lookup")


class State(MessagesState):
    round: int


def build_graph(task: dict, texts: dict, args):
    llm = ChatOpenAI(model=MODEL, base_url=args.base_url, api_key=args.api_key, temperature=0,
                     max_tokens=args.max_tokens, streaming=args.stream)
    tools = [make_lookup(texts)] if task["kind"] == "tool" else []
    forced = llm.bind_tools(tools, tool_choice="lookup") if tools else llm

    def agent(name: str):
        def node(state: State):
            msgs = state["messages"]
            model = forced if tools and not any(isinstance(m, ToolMessage) for m in msgs) and name == "solver" \
                else llm
            reply = model.invoke([SystemMessage(SYSTEM[name])] + msgs)
            reply.name = name
            out = {"messages": [reply]}
            if name == "summarizer":
                out["round"] = state.get("round", 0) + 1
            return out
        return node

    g = StateGraph(State)
    for name in ("solver", "critic", "summarizer"):
        g.add_node(name, agent(name))
    g.add_edge(START, "solver")
    if tools:
        g.add_node("tools", ToolNode(tools))
        g.add_conditional_edges("solver", tools_condition, {"tools": "tools", END: "critic"})
        g.add_edge("tools", "solver")
    else:
        g.add_edge("solver", "critic")
    g.add_edge("critic", "summarizer")
    g.add_conditional_edges("summarizer", lambda s: END if s["round"] >= args.rounds else "solver",
                            {END: END, "solver": "solver"})
    return g.compile()


def main(argv=None) -> int:
    args = parser(__doc__.splitlines()[0], "ChatOpenAI(streaming=True) (SSE responses)").parse_args(argv)
    picked, texts = load_tasks(args)
    for k, task in enumerate(picked, start=args.first_conversation):
        mark(args.record, {"conversation": k, "task": task["id"], "framework": "langgraph", "team": "sequential",
                           "rounds": args.rounds})
        graph = build_graph(task, texts, args)
        t0 = time.perf_counter()
        state = graph.invoke({"messages": [HumanMessage(task_text(task))], "round": 0})
        secs = time.perf_counter() - t0
        msgs = [{"type": m.type, "name": getattr(m, "name", None), "text": str(m.content)[:300]}
                for m in state["messages"]]
        print(json.dumps({"conversation": k, "task": task["id"], "seconds": round(secs, 1), "messages": msgs},
                         ensure_ascii=False), flush=True)
        print(f"langgraph_team: conversation {k} ({task['id']}): {secs:.1f} s, {len(msgs)} messages",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
