"""``ServeBackend``: the front door's way into the Serve application of its region."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from ray import serve

from cluster.serve.app import ENGINE_DEPLOYMENT
from cluster.serve.streams import relay
from cluster.types import Backend, Chunk, GenerateRequest, ModelInfo


class ServeBackend(Backend):
    def __init__(self, app_name: str, call_timeout_s: float = 30.0):
        self.app_name = app_name
        self.handle = serve.get_app_handle(app_name)  # the Router deployment
        self.call_timeout_s = call_timeout_s

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
        async with contextlib.aclosing(relay(self.handle.options(stream=True).generate.remote(request), "router",
                                             None)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def models(self) -> list[ModelInfo]:
        return await asyncio.wait_for(self.handle.models.remote(), self.call_timeout_s)

    async def ready(self) -> bool:
        try:
            return await asyncio.wait_for(self.handle.ready.remote(), self.call_timeout_s)
        except Exception:  # noqa: BLE001 -- not answering is not ready
            return False
