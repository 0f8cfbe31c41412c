"""Rank 0's end of an expert-parallel group: join, install the combine, greet the workers."""

from __future__ import annotations

from engine.config import ParallelConfig
from engine.native.models.base import CausalLM
from engine.native.parallel.broadcast import StepBroadcaster
from engine.native.parallel.group import ExpertGroup
from engine.native.parallel.wire import Hello


def check_expert_parallel(model: CausalLM, parallel: ParallelConfig) -> None:
    """Splitting only makes sense for a model with routed experts (the split itself is checked at load)."""
    if model.num_expert_params() == 0:
        raise ValueError(
            f"parallel.ep_size: {type(model).__name__} has no routed experts to split over "
            f"{parallel.ep_size} ranks; use ep_size=1"
        )


def start_driver(model: CausalLM, parallel: ParallelConfig, hello: Hello) -> StepBroadcaster:
    """Join the group as rank 0 (blocks until every rank joined and checked it holds the same model)."""
    if parallel.ep_rank != 0:
        raise ValueError(
            f"parallel.ep_rank: the engine runs on rank 0; rank {parallel.ep_rank} runs engine.api.run_expert_worker"
        )
    check_expert_parallel(model, parallel)
    group = ExpertGroup.join(parallel, model.device)
    try:
        model.set_moe_combine(group.all_reduce_sum)
        broadcaster = StepBroadcaster(group)
        broadcaster.hello(hello)
    except BaseException:
        group.close()
        raise
    return broadcaster
