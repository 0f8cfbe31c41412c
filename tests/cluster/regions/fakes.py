"""Backends that misbehave on purpose, for the region tests (and the telemetry tests' regions)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator

from cluster.chunks import error_chunk
from cluster.types import RESOURCE_EXHAUSTED, UNAVAILABLE, Backend, Chunk, GenerateRequest, ModelInfo

UNBOUND = "127.0.0.1:0"  # a peer's target until its front door is bound (see aim_peers)


def aim_peers(router, ports: dict[str, int]) -> None:
    """Point a region router's peers at their front doors, bound on port 0 and read back.

    Regions that know each other cannot all know the ports before any is bound; a PeerBackend
    makes its channel on first use, so its target may change until the router starts.
    """
    for peer in router.peers:
        peer.peer = dataclasses.replace(peer.peer, target=f"127.0.0.1:{ports[peer.peer.name]}")


def refusing_port() -> socket.socket:
    """A loopback port that refuses connections (bound, never listening) and stays so until closed."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


class _Wrapper(Backend):
    def __init__(self, inner: Backend):
        self.inner = inner

    async def models(self) -> list[ModelInfo]:
        return await self.inner.models()

    async def ready(self) -> bool:
        return True


class _AfterTokens(_Wrapper):
    def __init__(self, inner: Backend, tokens: int):
        super().__init__(inner)
        self.tokens = tokens


class BreaksAfter(_AfterTokens):
    """The region's own backend, losing every stream after ``tokens`` tokens (a replica dying)."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        sent = 0
        async with contextlib.aclosing(self.inner.generate(request)) as chunks:
            async for chunk in chunks:
                if sent + len(chunk.token_ids) > self.tokens:
                    yield error_chunk(UNAVAILABLE, "replica", "replica lost (test)")
                    return
                sent += len(chunk.token_ids)
                yield chunk


class HoldsAfter(_AfterTokens):
    """The region's own backend, going silent after ``tokens`` tokens until the call is cancelled: a region
    about to die, which a test then stops, with the rest of the answer never sent."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        sent = 0
        async with contextlib.aclosing(self.inner.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk
                sent += len(chunk.token_ids)
                if sent >= self.tokens and not chunk.finished:
                    await asyncio.Event().wait()


class Full(_Wrapper):
    """A region whose replicas' queues are all full."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        yield error_chunk(RESOURCE_EXHAUSTED, "queue", "every replica's queue is full; retry later")
