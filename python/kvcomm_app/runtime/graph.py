"""An agent graph: workers on a topology plus a decision agent, with their templates."""
from __future__ import annotations

from dataclasses import dataclass

from .agents import CONDITION, CURRENT, HISTORY, QUESTION, Agent, Role, SlotRef
from .topology import Topology, topological_order


@dataclass
class AgentGraph:
    topology: Topology
    agents: list[Agent]           # workers, in execution (topological) order
    decision: Agent | None        # reads everyone's final-round reply, answers last

    @property
    def rounds(self) -> int:
        return self.topology.rounds

    @property
    def all_agents(self) -> list[Agent]:
        return self.agents + ([self.decision] if self.decision else [])

    def by_id(self, agent_id: str) -> Agent:
        for a in self.all_agents:
            if a.id == agent_id:
                return a
        raise KeyError(f"no agent with id {agent_id!r}")


def _unique_names(roles: list[Role]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for role in roles:
        seen[role.name] = seen.get(role.name, 0) + 1
        names.append(role.name if seen[role.name] == 1 else f"{role.name}{seen[role.name]}")
    return names


def _reads_of(i: int, topo: Topology, roles: list[Role]) -> tuple[SlotRef, ...]:
    """Question first, then each heard agent's reply followed by its tool result when the
    tool runs after that agent; history replies; the agent's own 'before' tool result."""
    reads = [SlotRef(QUESTION)]
    for j in topo.sources(i):
        reads.append(SlotRef(CURRENT, str(j)))
        if roles[j].tool is not None:
            reads.append(SlotRef(CONDITION, str(j)))
    for j in topo.history_sources(i):
        reads.append(SlotRef(HISTORY, str(j)))
    if roles[i].tool is not None and roles[i].tool.phase == "before":
        reads.append(SlotRef(CONDITION, str(i)))
    return tuple(reads)


def render_template(agent: Agent, titles: dict[str, str], question_label: str,
                    labels: dict[str, str] | None = None) -> str:
    """The user-turn text with placeholders: one labelled block per slot, the role's
    instruction last. Labels are fixed text, so they are part of the template segments.
    labels: agent id -> the label of its tool's result, where the tool names one."""
    labels = labels or {}
    blocks = []
    for slot in agent.reads:
        if slot.kind == QUESTION:
            label = f"{question_label}:"
        elif slot.kind == CURRENT:
            label = f"Reply of the {titles[slot.source]}:"
        elif slot.kind == HISTORY:
            who = "your own" if slot.source == agent.id else f"the {titles[slot.source]}'s"
            label = f"Last round, {who} reply:"
        elif labels.get(slot.source):
            label = f"{labels[slot.source]}:"
        elif slot.source == agent.id:
            label = "Results of your tool:"
        else:
            label = f"Results of the {titles[slot.source]}'s tool:"
        blocks.append(f"{label}\n{{{slot.placeholder}}}")
    blocks.append(agent.role.instruction)
    return "\n\n".join(blocks)


def build_graph(topology: Topology, roles: list[Role], decision_role: Role | None,
                question_label: str = "Question") -> AgentGraph:
    """Place `roles[i]` on node i of `topology`; ids are "0".."n-1" and the decision
    agent is "n". Templates are generated from what each agent reads."""
    if len(roles) != topology.n_agents:
        raise ValueError(f"{len(roles)} roles for a topology of {topology.n_agents} agents")
    names = _unique_names(roles + ([decision_role] if decision_role else []))
    titles = {str(i): r.title for i, r in enumerate(roles)}
    labels = {str(i): r.tool.label for i, r in enumerate(roles) if r.tool is not None and r.tool.label}
    agents = {i: Agent(str(i), names[i], roles[i], _reads_of(i, topology, roles))
              for i in range(topology.n_agents)}
    order = [agents[i] for i in topological_order(topology)]
    for a in order:
        a.template = render_template(a, titles, question_label, labels)
    decision = None
    if decision_role is not None:
        reads = [SlotRef(QUESTION)]
        for i in range(topology.n_agents):
            reads.append(SlotRef(CURRENT, str(i)))
            if roles[i].tool is not None:
                reads.append(SlotRef(CONDITION, str(i)))
        n = topology.n_agents
        decision = Agent(str(n), names[n], decision_role, tuple(reads), is_decision=True)
        decision.template = render_template(decision, titles, question_label, labels)
    return AgentGraph(topology, order, decision)
