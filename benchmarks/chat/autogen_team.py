"""A 3-agent AutoGen team (solver, critic, summarizer; RoundRobinGroupChat, or with --team
selector a SelectorGroupChat whose model picks the next speaker) on the tasks of
tests/fixtures/chat/tasks.json, talking to an OpenAI-compatible server.

Runs in the AutoGen client environment (bash .ci/chat_clients.sh autogen):

    build/venv-autogen/bin/python benchmarks/chat/autogen_team.py \\
        --base-url http://127.0.0.1:8100/v1 [--record http://127.0.0.1:8200] [--rounds 1] \\
        [--team round_robin|selector] [--only 0 3] [--stream]

The model client is AutoGen's OpenAIChatCompletionClient set up as for OpenAI, except for
base_url and the model_info that AutoGen requires for a model name it does not know. One
departure, for the tool task only: AutoGen's AssistantAgent always sends tool_choice "auto",
which a 135M model answers in prose instead of calling the tool; ForcedFirstLookup turns that
into the named tool (vLLM then constrains the output to the tool's arguments) until the tool
has run once, so the traffic carries a real tool call and tool result. The server needs a tool
call parser for that (vLLM: --tool-call-parser ...; docs/chat-frameworks.md).

--record: the recording proxy (record_proxy.py) to tell which conversation the next calls
belong to; the framework's traffic goes through --base-url as usual. Prints one JSON line per
conversation (task, seconds, the team's messages) on stdout.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat, SelectorGroupChat
from autogen_core.models import FunctionExecutionResultMessage
from autogen_core.tools import FunctionTool
from autogen_ext.models.openai import OpenAIChatCompletionClient

from common import MODEL, SYSTEM, load_tasks, lookup_function, mark, parser, task_text

# What AutoGen needs to know about a model it has no entry for (anything but OpenAI's names).
MODEL_INFO = {"vision": False, "function_calling": True, "json_output": False, "family": "unknown",
              "structured_output": False}
# What SelectorGroupChat's selector reads about each agent (its {roles}).
DESCRIPTION = {"solver": "Solves the task.", "critic": "Checks the solver's answer.",
               "summarizer": "States the final answer."}


class ForcedFirstLookup(OpenAIChatCompletionClient):
    """OpenAIChatCompletionClient that names `tool` where AssistantAgent sends "auto" and no
    tool has run yet in the messages: the only change to the request is tool_choice."""

    def __init__(self, tool, **kw):
        super().__init__(**kw)
        self._tool = tool   # a Tool object: AssistantAgent hands the client schemas, create() wants the tool

    def _choice(self, messages, tools, tool_choice):
        if tools and tool_choice == "auto" and not any(isinstance(m, FunctionExecutionResultMessage) for m in messages):
            return self._tool
        return tool_choice

    async def create(self, messages, *, tools=(), tool_choice="auto", **kw):
        return await super().create(messages, tools=tools, tool_choice=self._choice(messages, tools, tool_choice), **kw)

    def create_stream(self, messages, *, tools=(), tool_choice="auto", **kw):
        return super().create_stream(messages, tools=tools, tool_choice=self._choice(messages, tools, tool_choice), **kw)


def make_lookup(texts: dict) -> FunctionTool:
    return FunctionTool(lookup_function(texts), description="Look up reference text about a topic.", name="lookup")


def build_team(task: dict, texts: dict, args):
    kw = dict(model=MODEL, base_url=args.base_url, api_key=args.api_key, model_info=MODEL_INFO,
              temperature=0.0, max_tokens=args.max_tokens)
    tool_task = task["kind"] == "tool"
    client = OpenAIChatCompletionClient(**kw)
    lookup = make_lookup(texts)
    solver = AssistantAgent("solver", ForcedFirstLookup(lookup, **kw) if tool_task else client,
                            system_message=SYSTEM["solver"], tools=[lookup] if tool_task else None,
                            description=DESCRIPTION["solver"], model_client_stream=args.stream)
    critic = AssistantAgent("critic", client, system_message=SYSTEM["critic"], description=DESCRIPTION["critic"],
                            model_client_stream=args.stream)
    summarizer = AssistantAgent("summarizer", client, system_message=SYSTEM["summarizer"],
                                description=DESCRIPTION["summarizer"], model_client_stream=args.stream)
    agents = [solver, critic, summarizer]
    if args.team == "selector":
        return SelectorGroupChat(agents, model_client=client, max_turns=3 * args.rounds,
                                 model_client_streaming=args.stream)
    return RoundRobinGroupChat(agents, max_turns=3 * args.rounds)


async def run(args) -> int:
    picked, texts = load_tasks(args)
    for k, task in enumerate(picked, start=args.first_conversation):
        mark(args.record, {"conversation": k, "task": task["id"], "framework": "autogen", "team": args.team,
                           "rounds": args.rounds})
        team = build_team(task, texts, args)
        t0 = time.perf_counter()
        result = await team.run(task=task_text(task))
        secs = time.perf_counter() - t0
        msgs = [{"source": m.source, "type": type(m).__name__, "text": m.to_text()[:300]} for m in result.messages]
        print(json.dumps({"conversation": k, "task": task["id"], "team": args.team, "seconds": round(secs, 1),
                          "stop_reason": result.stop_reason, "messages": msgs}, ensure_ascii=False), flush=True)
        print(f"autogen_team: conversation {k} ({task['id']}): {secs:.1f} s, {len(result.messages)} messages",
              file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    ap = parser(__doc__.splitlines()[0], "model_client_stream=True (SSE responses)")
    ap.add_argument("--team", choices=["round_robin", "selector"], default="round_robin",
                    help="the team stops after 3 x ROUNDS agent turns either way")
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
