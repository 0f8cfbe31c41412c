"""``ServeBackend``: the front door's way into the engine replicas of its region, one Ray hop away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve

from cluster.config import ClusterConfig
from cluster.serve.app import app_name
from cluster.serve.replica_router import ReplicaRouter
from cluster.serve.routing_hint import RoutingHint
from cluster.types import Backend, Chunk, GenerateRequest, ModelInfo, ReplicaStatus

MAX_REPLICAS_POLLED = 256  # a bound on one poll's asks, whatever the deployment's size


class ServeBackend(Backend):
    def __init__(self, cfg: ClusterConfig, call_timeout_s: float = 30.0):
        self.app_name = app_name(cfg)
        self.router = ReplicaRouter(serve.get_app_handle(self.app_name), cfg)  # the app's ingress: the replicas
        self.call_timeout_s = call_timeout_s

    async def replica_statuses(self, timeout_s: float) -> list[ReplicaStatus]:
        """The status of every engine replica that answers within ``timeout_s`` (for the metrics poller).

        A Serve handle reaches one replica per call, so ask again with the replicas that answered
        as the hint's ``avoid`` (our request router tries those last) until one answers twice.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        seen: dict[str, ReplicaStatus] = {}
        for _ in range(MAX_REPLICAS_POLLED):
            left = until - loop.time()
            if left <= 0:
                break
            try:
                status = await asyncio.wait_for(
                    self.router.engine().status.remote(hint=RoutingHint(avoid=frozenset(seen))), left
                )
            except Exception:  # noqa: BLE001 -- a replica that cannot answer now; the others still count
                break
            if status.replica in seen:
                break
            seen[status.replica] = status
        return list(seen.values())

    # ---- drills: faults inside the region (cluster/frontdoor/admin.py) ----------------------------

    async def kill_replica(self) -> str:
        """One engine replica (whichever Serve picks) exits as if it crashed; returns its id."""
        return await asyncio.wait_for(self.router.engine().crash.remote(), self.call_timeout_s)

    async def kill_rank(self, rank: int) -> str:
        """One expert-parallel rank of one replica dies; returns the replica's id."""
        return await asyncio.wait_for(self.router.engine().kill_rank.remote(rank), self.call_timeout_s)

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        # No idle timeout of its own: the front door applies backend_timeout_s and closes us.
        return self.router.generate(request)

    async def models(self) -> list[ModelInfo]:
        return await self.router.models()

    async def ready(self) -> bool:
        try:
            return await asyncio.wait_for(self.router.ready(), self.call_timeout_s)
        except Exception:  # noqa: BLE001 -- not answering is not ready
            return False
