"""Faults a drill injects into a region through its Admin service (``frontdoor.admin: true``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from cluster.types import Backend, Chunk, GenerateRequest, ModelInfo


class FaultInjector(Backend):
    """Wraps the region's own backend: ``delay_s`` > 0 makes every stream wait that long first."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.delay_s = 0.0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        async with contextlib.aclosing(self.inner.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def models(self) -> list[ModelInfo]:
        return await self.inner.models()

    async def ready(self) -> bool:
        return await self.inner.ready()
