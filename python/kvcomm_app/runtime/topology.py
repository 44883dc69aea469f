"""Who hears whom: the communication topologies of a multi-agent graph.

A topology over n worker agents says, for each agent i, whose reply *this round*
it reads (`hears`, which fixes the execution order) and whose reply *last round*
it reads (`hears_history`, which crosses rounds and so never constrains the order).
The decision agent is added by the graph builder and always reads everyone.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Topology:
    name: str
    n_agents: int
    rounds: int = 1
    hears: dict[int, tuple[int, ...]] = field(default_factory=dict)
    hears_history: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if self.n_agents < 1:
            raise ValueError(f"a topology needs at least one agent, got n_agents={self.n_agents}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        for table in (self.hears, self.hears_history):
            for i, srcs in table.items():
                for j in (i, *srcs):
                    if not 0 <= j < self.n_agents:
                        raise ValueError(f"{self.name}: agent index {j} outside 0..{self.n_agents - 1}")
        for i, srcs in self.hears.items():
            if i in srcs:
                raise ValueError(f"{self.name}: agent {i} cannot hear its own current reply")
        topological_order(self)  # raises on a cycle

    def sources(self, i: int) -> tuple[int, ...]:
        return tuple(self.hears.get(i, ()))

    def history_sources(self, i: int) -> tuple[int, ...]:
        return tuple(self.hears_history.get(i, ()))


def topological_order(topo: Topology) -> list[int]:
    """Agents ordered so that every agent runs after all agents it hears this round.
    Ties go to the lower index, so the order is the node order whenever it is valid."""
    indegree = {i: len(set(topo.sources(i))) for i in range(topo.n_agents)}
    listeners: dict[int, list[int]] = {i: [] for i in range(topo.n_agents)}
    for i in range(topo.n_agents):
        for j in set(topo.sources(i)):
            listeners[j].append(i)
    ready = sorted(i for i, d in indegree.items() if d == 0)
    order = []
    while ready:
        j = ready.pop(0)
        order.append(j)
        for i in listeners[j]:
            indegree[i] -= 1
            if indegree[i] == 0:
                ready.append(i)
        ready.sort()
    if len(order) != topo.n_agents:
        stuck = sorted(set(range(topo.n_agents)) - set(order))
        raise ValueError(f"topology {topo.name!r} has a cycle among agents {stuck}")
    return order


def fully_connected(n: int) -> Topology:
    """A DAG in node order: agent i hears every j < i (the paper's setting)."""
    return Topology("fully_connected", n, 1, {i: tuple(range(i)) for i in range(n)})


def chain(n: int) -> Topology:
    """Agent i hears only agent i-1."""
    return Topology("chain", n, 1, {i: (i - 1,) for i in range(1, n)})


def star(n: int) -> Topology:
    """Agent 0 is the hub and speaks first; every other agent hears only the hub."""
    return Topology("star", n, 1, {i: (0,) for i in range(1, n)})


def layered(sizes: list[int] | tuple[int, ...]) -> Topology:
    """Agents in layers of the given sizes; each agent hears every agent of the layer before."""
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"layer sizes must be positive, got {sizes}")
    hears, start, prev = {}, 0, ()
    for size in sizes:
        layer = tuple(range(start, start + size))
        for i in layer:
            hears[i] = prev
        prev, start = layer, start + size
    return Topology("layered", start, 1, hears)


def debate(n: int, rounds: int = 2) -> Topology:
    """Every agent answers each round; from the second round on it reads every agent's
    reply of the round before (its own included) through {agent_<id>_history}."""
    if rounds < 2:
        raise ValueError(f"a debate needs at least 2 rounds, got {rounds}")
    everyone = tuple(range(n))
    return Topology("debate", n, rounds, {}, {i: everyone for i in range(n)})


TOPOLOGIES = ("fully_connected", "chain", "star", "layered", "debate")


def make_topology(name: str, n_agents: int, *, rounds: int = 2,
                  layers: list[int] | None = None) -> Topology:
    """Build a topology by name. `layers` (sizes) applies to 'layered' (default: pairs),
    `rounds` to 'debate'."""
    if name == "fully_connected":
        return fully_connected(n_agents)
    if name == "chain":
        return chain(n_agents)
    if name == "star":
        return star(n_agents)
    if name == "layered":
        if layers is None:
            layers = [2] * (n_agents // 2) + ([n_agents % 2] if n_agents % 2 else [])
        if sum(layers) != n_agents:
            raise ValueError(f"layer sizes {layers} do not add up to {n_agents} agents")
        return layered(layers)
    if name == "debate":
        return debate(n_agents, rounds)
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
