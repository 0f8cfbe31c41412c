"""Backends that misbehave on purpose, for the region tests (and the telemetry tests' regions)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

from cluster.chunks import error_chunk
from cluster.types import RESOURCE_EXHAUSTED, UNAVAILABLE, Backend, Chunk, GenerateRequest, ModelInfo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Wrapper(Backend):
    def __init__(self, inner: Backend):
        self.inner = inner

    async def models(self) -> list[ModelInfo]:
        return await self.inner.models()

    async def ready(self) -> bool:
        return True


class BreaksAfter(_Wrapper):
    """The region's own backend, losing every stream after ``tokens`` tokens (a replica dying)."""

    def __init__(self, inner: Backend, tokens: int):
        super().__init__(inner)
        self.tokens = tokens

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        sent = 0
        async with contextlib.aclosing(self.inner.generate(request)) as chunks:
            async for chunk in chunks:
                if sent + len(chunk.token_ids) > self.tokens:
                    yield error_chunk(UNAVAILABLE, "replica", "replica lost (test)")
                    return
                sent += len(chunk.token_ids)
                yield chunk


class Full(_Wrapper):
    """A region whose replicas' queues are all full."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        yield error_chunk(RESOURCE_EXHAUSTED, "queue", "every replica's queue is full; retry later")
