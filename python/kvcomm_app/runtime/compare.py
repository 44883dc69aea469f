"""Dense and KVCOMM on the same questions: warm-up first, then the measured questions.

Warm-up questions run in both modes too: in KVCOMM they fill the anchor pool (a slot
shares only once it has two anchors), in dense they warm the same kernels, so the
measured questions compare the two modes in the same state. Warm-up records are kept
(phase "warmup") and reported apart from the measured ones.
"""
from __future__ import annotations

from typing import Callable

from .datasets import Problem
from .executor import GraphRunner
from .records import DENSE, KVCOMM, MEASURE, WARMUP, QuestionRecord


def run_comparison(runner: GraphRunner, problems: list[Problem], warmup: list[Problem] = (), *,
                   modes: tuple[str, ...] = (DENSE, KVCOMM), progress: bool = True,
                   on_record: Callable[[QuestionRecord], None] | None = None,
                   desc: str = "questions", paired=None) -> list[QuestionRecord]:
    """Run every question in every mode (dense first, so KVCOMM never benefits from a
    cache the dense run left warmer). Returns the records in run order.

    paired: a PairedReplay (kvcomm_app.runtime.paired): each dense run is traced and its
    calls replayed on the replay's own KVCOMM engine, teacher-forced, right after it (a
    record of mode "paired"); needs DENSE in `modes`."""
    if paired is not None and DENSE not in modes:
        raise ValueError("paired evaluation replays the dense run: modes must include dense")
    jobs = [(p, WARMUP) for p in warmup] + [(p, MEASURE) for p in problems]
    records: list[QuestionRecord] = []
    bar = _bar(len(jobs) * len(modes), desc, progress)
    try:
        for problem, phase in jobs:
            for mode in modes:
                if bar is not None:
                    bar.set_description(f"{desc} [{phase} {mode}]")
                traced = paired is not None and mode == DENSE
                if traced:
                    runner.trace, runner.trace_logits = [], paired.positions
                try:
                    rec = runner.run(problem, mode, phase)
                    trace = runner.trace
                finally:
                    runner.trace = None
                found = [rec]
                if traced:
                    found.append(paired.run(problem, phase, trace))
                for r in found:
                    records.append(r)
                    if on_record is not None:
                        on_record(r)
                if bar is not None:
                    kv = [c for r in records if r.mode == KVCOMM for c in r.calls if not c.shadow]
                    reused = sum(1 for c in kv if c.path == "reuse")
                    bar.set_postfix_str(f"reuse {reused}/{len(kv)}" if kv else "")
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety, not a dependency
        return None
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)
