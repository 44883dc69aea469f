"""What the scheduler-side connector asks the worker side to do in one engine step, and
what the worker answers. Plain picklable records: vLLM ships them between processes
(scheduler -> workers inside the step's SchedulerOutput, workers -> scheduler in the
step's KVConnectorOutput)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class CallLayout:
    """An agent call's prompt as the server's front end laid it out (token positions)."""
    agent_key: str
    agent_name: str
    session: str
    round: int
    learn: bool
    spans: list           # [(slot, start, stop)] token ranges of the placeholders
    segments: list        # [(start, stop)] the text after each placeholder
    s0: int
    problem: str | None   # why the layout cannot reuse (a slot edge inside a token), else None
    max_tokens: int
    merged: list = field(default_factory=list)   # segment tokens that took in a content's whitespace
    deferred: list = field(default_factory=list)  # slots this call carries first (encoded after it)


@dataclass
class PlanResult:
    """The worker's plan of a call, as the scheduler needs it."""
    path: str                  # "reuse", "partial" or "dense"
    reason: str
    prefix: int                # prompt tokens the connector loads; vLLM computes the rest
    slots: dict = field(default_factory=dict)    # slot -> what was decided
    gates: dict = field(default_factory=dict)    # slot -> the decision's numbers
    record: bool = False       # after the prefill, read the computed KV back for deltas
    pool_anchors: int = 0      # the pool after planning (reported with the call)
    pool_bytes: int = 0


@dataclass
class PlanJob:
    """Decide the path of a call and, for reuse, assemble its estimated KV."""
    req_id: str
    ids: list
    call: CallLayout
    cached: int = 0    # prompt tokens vLLM's prefix cache held when the scheduler first asked


@dataclass
class LoadJob:
    """Write positions [start, stop) of a planned call into its blocks (its staged KV, or the
    agent's exact S0 for a dense call)."""
    req_id: str
    block_ids: list
    start: int
    stop: int
    agent_key: str = ""


@dataclass
class SaveJob:
    """A prompt's prefill is complete: read its KV back. kind: "template" (the agent's
    exact S0 and segment KV), "encode" (a content's base), "record" (the KV a dense or
    partial call computed -> deltas)."""
    req_id: str
    kind: str
    block_ids: list
    prompt_len: int
    params: dict = field(default_factory=dict)
    release: bool = False   # the request has finished: its blocks are freed once this is read


@dataclass
class CaptureJob:
    """A finished call's reply: read positions [start, stop) (its content tokens that
    were fed back) as the base of {agent_<name>_current}."""
    req_id: str
    block_ids: list
    start: int
    stop: int
    ids: list
    call: CallLayout


@dataclass
class KVCommMeta(KVConnectorMetadata):
    plans: list = field(default_factory=list)
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)
    captures: list = field(default_factory=list)
    drops: list = field(default_factory=list)       # finished request ids: free worker-side state


@dataclass
class KVCommWorkerMeta(KVConnectorWorkerMetadata):
    plans: dict = field(default_factory=dict)    # req_id -> PlanResult

    def aggregate(self, other: "KVCommWorkerMeta") -> "KVCommWorkerMeta":
        """Tensor-parallel ranks plan the same calls; their answers agree by construction
        (decisions from reduced distances). Should they not, the call runs dense on all
        ranks: reuse only where every rank could assemble."""
        out = KVCommWorkerMeta(dict(self.plans))
        for req_id, res in other.plans.items():
            mine = out.plans.get(req_id)
            if mine is None:
                out.plans[req_id] = res
            elif mine.path != res.path or mine.prefix != res.prefix:
                dense = mine if mine.path == "dense" else res
                out.plans[req_id] = PlanResult("dense", f"ranks disagree ({mine.reason} / {res.reason})",
                                               0, dense.slots, dense.gates)
        return out
