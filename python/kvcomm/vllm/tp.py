"""The tensor-parallel group of a vLLM worker, as the share-or-anchor decision needs it.

The decision itself is the planner's (kvcomm.plan.decide): with more than one rank, every
rank reduces its squared distances over the group and hands the totals to the pool's own
rule, so ranks holding different KV heads take the decision one process holding all heads
would take (min_anchors, the entropy gate, reasons and activation credit included)."""
from __future__ import annotations

from ..plan.decide import RankGroup


def vllm_rank_group() -> RankGroup:
    """vLLM's tensor-parallel group of this worker (one rank outside a distributed run)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
        world = get_tensor_model_parallel_world_size()
    except Exception:  # not initialised: a single process
        return RankGroup(1)
    if world == 1:
        return RankGroup(1)
    return RankGroup(world, get_tp_group().all_reduce)
