"""``ServeBackend``: the front door's way into the Serve application of its region."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from cluster.serve.app import ENGINE_DEPLOYMENT
from cluster.serve.routing import RoutingHint
from cluster.serve.streams import relay
from cluster.types import Backend, Chunk, GenerateRequest, ModelInfo

MAX_REPLICAS_POLLED = 256  # a bound on one poll's asks, whatever the deployment's size


class ServeBackend(Backend):
    def __init__(self, app_name: str, call_timeout_s: float = 30.0):
        self.app_name = app_name
        self.handle = serve.get_app_handle(app_name)  # the Router deployment
        self.call_timeout_s = call_timeout_s
        self._replicas: Any = None  # a handle to the engine deployment, made on first use

    async def replica_statuses(self, timeout_s: float) -> list[dict[str, Any]]:
        """The status of every engine replica that answers within ``timeout_s`` (for the metrics poller).

        A Serve handle reaches one replica per call, so ask again with the replicas that answered
        as the hint's ``avoid`` (our request router tries those last) until one answers twice.
        """
        if self._replicas is None:
            self._replicas = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=self.app_name)
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        seen: dict[str, dict[str, Any]] = {}
        for _ in range(MAX_REPLICAS_POLLED):
            left = until - loop.time()
            if left <= 0:
                break
            try:
                status = await asyncio.wait_for(
                    self._replicas.status.remote(hint=RoutingHint(avoid=frozenset(seen))), left
                )
            except Exception:  # noqa: BLE001 -- a replica that cannot answer now; the others still count
                break
            if status["replica"] in seen:
                break
            seen[status["replica"]] = status
        return list(seen.values())

    # ---- drills: faults inside the region (cluster/frontdoor/admin.py) ----------------------------

    async def kill_replica(self) -> str:
        """One engine replica (whichever Serve picks) exits as if it crashed; returns its id."""
        replica = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=self.app_name)
        return await asyncio.wait_for(replica.crash.remote(), self.call_timeout_s)

    async def kill_rank(self, rank: int) -> str:
        """One expert-parallel rank of one replica dies; returns the replica's id."""
        replica = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=self.app_name)
        return await asyncio.wait_for(replica.kill_rank.remote(rank), self.call_timeout_s)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        # No idle timeout here: the front door applies backend_timeout_s and closes us.
        async with contextlib.aclosing(
            relay(self.handle.options(stream=True).generate.remote(request), "router", None)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def models(self) -> list[ModelInfo]:
        return await asyncio.wait_for(self.handle.models.remote(), self.call_timeout_s)

    async def ready(self) -> bool:
        try:
            return await asyncio.wait_for(self.handle.ready.remote(), self.call_timeout_s)
        except Exception:  # noqa: BLE001 -- not answering is not ready
            return False
