"""What a run leaves behind: one record per agent call and one per question run.

Plain dataclasses of JSON-friendly values, so metrics are pure functions over them
(python/kvcomm_app/runtime/metrics.py) and a run can be saved and re-scored later.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from kvcomm.engine.modes import DENSE, KVCOMM, MODES  # noqa: F401  (the engine's modes, re-exported)

WARMUP = "warmup"
MEASURE = "measure"
# A question record whose KVCOMM calls replayed the dense run's calls on identical inputs,
# fed the dense replies (teacher forcing): kvcomm_app.runtime.paired.
PAIRED = "paired"


@dataclass
class CallRecord:
    """One agent call. `ttft_ms` is what the engine measured from the call's start to the
    first token (encoding inputs, decisions, estimates, forward, first token)."""
    question_id: str
    mode: str                 # the run's mode: "dense" or "kvcomm"
    phase: str                # "warmup" or "measure"
    round: int
    agent_id: str
    agent_name: str
    role: str
    call_mode: str            # the mode this call ran with ("dense" for a pinned decision agent)
    path: str                 # "reuse", "partial" or "dense": what the engine actually did
    reason: str
    ttft_ms: float
    text: str
    inputs_digest: str        # sha1 over the inputs: equal digests = identical prompt content
    is_decision: bool = False
    shadow: bool = False      # a dense re-run of the decision agent on the same inputs
    timings: dict = field(default_factory=dict)
    first_token_id: int | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    slot_decisions: dict = field(default_factory=dict)
    slot_gates: dict = field(default_factory=dict)   # slot -> what the pool's decision saw
    tool: dict | None = None  # tool result this call produced or consumed, summarised
    # Token accounting of the engine (kvcomm.engine.AgentCall): exact prefix copied, prompt
    # tokens run through the model, content tokens this call encoded behind a header.
    s0_tokens: int = 0
    computed_tokens: int = 0
    encoded_tokens: int = 0
    recomputed: dict = field(default_factory=dict)    # recompute group -> tokens
    slot_anchors: dict = field(default_factory=dict)  # estimated slot -> anchor ids used
    slot_kinds: dict = field(default_factory=dict)    # slot -> "question", "condition" or "reply"
    # recompute 'deviation': tokens an early-layer probe ran, and the share of layers it ran
    probed_tokens: int = 0
    probe_fraction: float = 0.0
    # paired calls: TTFT of a dense prefill after the agent's cached exact S0 on the same
    # inputs (what prefix caching gives), timed right before this call
    prefix_ttft_ms: float | None = None
    fidelity: dict | None = None  # paired calls only: agreement with the dense twin (fidelity.py)


@dataclass
class QuestionRecord:
    """One question run through the whole graph in one mode."""
    question_id: str
    task: str
    mode: str
    phase: str
    gold: str
    prediction: str | None    # the final answer extracted from the decision agent
    correct: bool
    final_text: str
    judge_choice: str | None  # the decision agent's choice (same as prediction for most tasks)
    shadow_choice: str | None = None  # its choice under dense on identical inputs (kvcomm runs)
    calls: list[CallRecord] = field(default_factory=list)
    pool_size: int | None = None
    pool_bytes: int | None = None
    wall_ms: float = 0.0
    score: float | None = None   # the task's graded score when it has one (token F1 for squad)
    variant: str | None = None   # paired records of a --paired-variant replay: its label


def digest_inputs(inputs: dict[str, str]) -> str:
    blob = json.dumps(sorted(inputs.items()), ensure_ascii=False).encode("utf-8")
    return hashlib.sha1(blob).hexdigest()


def jsonable(value):
    """Best-effort conversion of engine objects (Decision, tensors) for records."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    fields = {k: getattr(value, k) for k in ("share", "reason", "candidates", "distances",
                                             "probs", "entropy", "threshold", "credited")
              if hasattr(value, k)}
    if fields:
        return jsonable(fields)
    return repr(value)


def record_to_dict(rec: QuestionRecord) -> dict:
    return asdict(rec)


def record_from_dict(d: dict) -> QuestionRecord:
    d = dict(d)
    d["calls"] = [CallRecord(**c) for c in d.get("calls", [])]
    return QuestionRecord(**d)


def open_records(path: str, mode: str = "r"):
    """A JSON-lines records file opened as text; gzip-compressed when its name ends in
    .gz (results/ keeps raw per-call records as .jsonl.gz), plain otherwise."""
    if str(path).endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_record_dicts(path: str) -> list[dict]:
    """The question records of one file (`kvcomm eval --records`) as plain dicts."""
    with open_records(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_records(path: str) -> list[QuestionRecord]:
    return [record_from_dict(d) for d in read_record_dicts(path)]


def write_records(records: list[QuestionRecord], path: str) -> None:
    """One JSON line per question record; gzip-compressed when `path` ends in .gz."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open_records(path, "w") as f:
        for r in records:
            f.write(json.dumps(record_to_dict(r), ensure_ascii=False) + "\n")
