"""How to get an engine: ``create_engine`` (rank 0, or the only rank) and ``run_expert_worker`` (ranks 1..).

What crosses an engine's boundary (``EngineClient`` and its dataclasses) is
``engine.types``; this module only assembles engines, loading torch lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from engine.config import EngineConfig

if TYPE_CHECKING:  # annotations only: the types live in engine.types, not here
    from engine.types import EngineClient, EngineInfo


class Rendezvous(Protocol):
    """An expert-parallel group's meeting point (``host_rendezvous``), hosted by this process."""

    port: int
    init_method: str

    def close(self) -> None: ...


def create_engine(config: EngineConfig, placement_group: Any = None) -> EngineClient:
    """An engine in this process, stepping in a background thread.

    With ``config.parallel.ep_size > 1`` this process is rank 0 of an
    expert-parallel group: it schedules, samples and broadcasts each step to
    ranks 1.., which run ``run_expert_worker`` with the same config (their own
    ``ep_rank``). Rank 0 hosts the rendezvous at ``parallel.init_method``; the
    call blocks until every rank has loaded its experts and joined (at most
    ``parallel.timeout_s`` after this rank's model is loaded), so start the
    workers concurrently, in any order. Loads torch lazily, so importing this
    module stays light.

    With ``config.backend == "vllm"`` the engine is vLLM's ``AsyncLLM``
    (``engine.vllm``), admitted and streamed by the same rules. Its output
    handler runs on the event loop that submits first. ``placement_group``
    (opaque here: a Ray placement group) is where vLLM's Ray executor puts
    its workers, one per bundle; the native engine ignores it.
    """
    if config.backend == "vllm":
        from engine.vllm.engine import VllmEngine

        return VllmEngine(config, placement_group)
    from engine.native.async_engine import AsyncEngine
    from engine.native.builder import build_engine_core

    return AsyncEngine(build_engine_core(config))


def run_expert_worker(config: EngineConfig, on_ready: Callable[[EngineInfo], None] | None = None) -> None:
    """Rank ``config.parallel.ep_rank >= 1`` of an EP group: run the steps rank 0 sends until it shuts down.

    Blocks for the group's whole life: returns when rank 0's engine shuts down;
    raises when rank 0 dies or is silent for ``parallel.timeout_s`` (a lost
    peer ends the group, it is never repaired in place). ``on_ready`` gets this
    rank's ``EngineInfo`` once it has joined, before the first step.
    """
    from engine.native.parallel.worker import run_worker

    run_worker(config, on_ready)


def host_rendezvous(host: str, world_size: int, timeout_s: float) -> Rendezvous:
    """A rendezvous for an expert-parallel group of ``world_size`` ranks, listening on ``host``.

    Bound now on a port the kernel picks (read back: no race with other
    processes for it). Give every rank ``init_method=rendezvous.init_method``
    and ``store_hosted=True``, keep the rendezvous until the group has ended,
    then ``close()`` it. Loads torch.
    """
    from engine.native.parallel.rendezvous import HostedStore

    return HostedStore(host, world_size, timeout_s)
