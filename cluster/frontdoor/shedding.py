"""Shedding load instead of failing: refusals with a retry hint, streams per connection, and a write timeout.

A full door says RESOURCE_EXHAUSTED with how long to wait (``retry-after-ms``, and gRPC's own
``grpc-retry-pushback-ms``, which grpc clients with a retry policy obey), so a busy region reads as
busy and never as dead: region routers and clients do not count RESOURCE_EXHAUSTED against a
region's health (``cluster.regions.codes``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

import grpc

from cluster.frontdoor.errors import abort

log = logging.getLogger(__name__)

RETRY_AFTER_MS = "retry-after-ms"
RETRY_PUSHBACK_MS = "grpc-retry-pushback-ms"  # gRPC A6: a server's pushback on the client's retries


def retry_hint(retry_after_ms: int) -> tuple[tuple[str, str], ...]:
    value = str(retry_after_ms)
    return ((RETRY_AFTER_MS, value), (RETRY_PUSHBACK_MS, value))


async def refuse(context: grpc.aio.ServicerContext, message: str, retry_after_ms: int) -> NoReturn:
    """End the call RESOURCE_EXHAUSTED, with ``message`` and the retry hint as trailing metadata."""
    context.set_trailing_metadata(retry_hint(retry_after_ms))
    await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    raise AssertionError("unreachable: abort raises")


class Connections:
    """Streams per client connection (grpc's ``context.peer()``: its address and port)."""

    def __init__(self, limit: int):
        self.limit = limit  # 0: no cap
        self.streams: collections.Counter[str] = collections.Counter()

    def admit(self, peer: str) -> bool:
        if self.limit and self.streams[peer] >= self.limit:
            return False
        self.streams[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self.streams[peer] -= 1
        if self.streams[peer] <= 0:
            del self.streams[peer]  # no entry per connection that ever called


def written(
    stream: Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]],
    write_timeout_s: float,
    retry_after_ms: int,
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[None]]:
    """A streaming handler that writes ``stream``'s messages itself, each within ``write_timeout_s``.

    Given an async generator, grpc.aio writes each message after the ``yield``, and that write waits
    while HTTP/2 flow control holds it (a client that does not read fills its window). A call
    cancelled there leaves the generator suspended until it is garbage collected, so its ``finally``
    blocks (the engine's abort, the in-flight counts) wait on the collector. Here the generator is
    always closed at once, and a client that took nothing for ``write_timeout_s`` loses its stream:
    the engine request is aborted, and the call ends RESOURCE_EXHAUSTED (delivered after what is
    already queued, if the client ever reads).
    """

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> None:
        async with contextlib.aclosing(stream(raw, context)) as messages:
            async for message in messages:
                try:
                    async with asyncio.timeout(write_timeout_s):
                        await context.write(message)
                except TimeoutError:
                    break  # closes the stream: the backend's generator, and the engine request
            else:
                return
        log.warning("write timeout: %s read nothing for %gs; its stream was stopped", context.peer(), write_timeout_s)
        message = f"write_timeout_s: the client read nothing for {write_timeout_s:g}s; stream stopped"
        # The status waits behind the queued messages; this call's task (and its slot) ends now.
        status = asyncio.ensure_future(_refuse_later(context, message, retry_after_ms))
        _pending.add(status)
        status.add_done_callback(_pending.discard)
        await asyncio.sleep(0)  # the abort has begun: grpc sends no OK status after us

    return handler


_pending: set[asyncio.Future] = set()  # statuses still waiting for their client: held, so not collected


async def _refuse_later(context: grpc.aio.ServicerContext, message: str, retry_after_ms: int) -> None:
    try:
        await refuse(context, message, retry_after_ms)
    except Exception:  # noqa: BLE001 -- AbortError once sent; a failed batch when the client left first
        pass
