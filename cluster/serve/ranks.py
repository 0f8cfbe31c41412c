"""The ranks of one expert-parallel group: rank 0 in the replica's own process, ranks 1.. as Ray actors.

Rank 0 runs the whole engine (scheduler, sampler, detokenizer) behind
``EngineClient`` and broadcasts each step to the other ranks, which run only
the model forward on their slice of the experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import ray

from engine.api import create_engine, run_expert_worker
from engine.config import DeviceUnavailableError, EngineConfig
from engine.types import EngineClient, EngineInfo

_T = TypeVar("_T")


def _on_reserved_gpu(start: Callable[[], _T]) -> _T:
    """``start()``; a CUDA device the rank cannot see is a placement fault, so the error names the cluster key."""
    try:
        return start()
    except DeviceUnavailableError as e:
        raise DeviceUnavailableError(
            f"replica.accelerator: gpu reserved a GPU for this rank, which cannot use it: {e}"
        ) from None


def start_rank_engine(config: EngineConfig, placement_group: Any = None) -> EngineClient:
    """Rank 0's engine (blocks until every rank has joined the process group and loaded its experts)."""
    return _on_reserved_gpu(lambda: create_engine(config, placement_group))


def run_rank_worker(config: EngineConfig, on_ready: Callable[[EngineInfo], None] | None = None) -> None:
    """Ranks 1..: run rank 0's steps until it stops the group."""
    _on_reserved_gpu(lambda: run_expert_worker(config, on_ready=on_ready))


@ray.remote(max_concurrency=2)  # ``run`` blocks one thread; ``info`` answers on the other
class WorkerRank:
    def __init__(self) -> None:
        self._info: EngineInfo | None = None

    def run(self, config: EngineConfig) -> None:
        run_rank_worker(config, on_ready=self._ready)

    def _ready(self, info: EngineInfo) -> None:
        self._info = info

    def info(self) -> EngineInfo | None:
        """This rank's figures (its share of the experts) once it has joined the group."""
        return self._info
