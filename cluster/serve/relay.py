"""Relaying a Serve handle's stream of chunks: the one place that turns its failures into chunks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError

from cluster.chunks import error_chunk
from cluster.types import RESOURCE_EXHAUSTED, UNAVAILABLE, Chunk


async def relay(
    stream: Any, callee: str, idle_timeout_s: float | None, queued_keepalive_s: float | None = None
) -> AsyncIterator[Chunk]:
    """The chunks of ``stream`` (a streaming DeploymentResponseGenerator) up to the final one.

    A full queue becomes RESOURCE_EXHAUSTED; silence for ``idle_timeout_s`` (the callee sends
    keepalives) or a callee that died becomes UNAVAILABLE naming ``callee``. Leaving early
    cancels the call, and the callee's generator is closed, which aborts the engine request.
    Until the callee's first chunk, a keepalive goes out every ``queued_keepalive_s``: a call waiting
    in the handle's queue for a busy callee is queueing, and must not read as lost to our own callers.
    """
    ended = False  # the call is over on its own: nothing to cancel
    keepalive_s = queued_keepalive_s
    try:
        while True:
            if keepalive_s is None:  # the common case: no task per chunk
                async with asyncio.timeout(idle_timeout_s):
                    chunk = await _anext(stream)
            else:
                async with contextlib.aclosing(_next(stream, idle_timeout_s, keepalive_s)) as waiting:
                    async for chunk in waiting:
                        if chunk is _QUEUED:
                            yield Chunk()
            if chunk is _END:
                ended = True
                return
            keepalive_s = None  # the callee answered: from now on its own keepalives speak for it
            ended = chunk.finished
            yield chunk
            if chunk.finished:
                return
    except BackPressureError:
        ended = True  # never assigned to a replica
        yield error_chunk(RESOURCE_EXHAUSTED, "queue", f"every {callee}'s queue is full; retry later")
    except TimeoutError:
        yield error_chunk(UNAVAILABLE, callee, f"no word from the {callee} for {idle_timeout_s:g}s")
    except Exception as e:  # noqa: BLE001 -- a callee that died mid-call fails this call only
        ended = True
        # Ray's errors run to a dozen lines (actor ids, OOM advice): the first says what happened
        first = (str(e).strip().splitlines() or [""])[0]
        yield error_chunk(UNAVAILABLE, callee, f"{callee} call failed: {type(e).__name__}: {first}")
    finally:
        if not ended:
            await _cancel(stream)


_QUEUED, _END = Chunk(), Chunk()  # _next's words for "still waiting" and "the stream ended" (never sent on)


async def _next(stream: Any, idle_timeout_s: float | None, keepalive_s: float | None) -> AsyncIterator[Chunk]:
    """``_QUEUED`` every ``keepalive_s`` while the stream's next chunk is awaited, then that chunk (``_END``
    at the stream's end); raises TimeoutError when ``idle_timeout_s`` passes without it."""
    loop = asyncio.get_running_loop()
    until = None if idle_timeout_s is None else loop.time() + idle_timeout_s
    pending = asyncio.ensure_future(_anext(stream))
    try:
        while True:
            left = None if until is None else until - loop.time()
            step = min((t for t in (left, keepalive_s) if t is not None), default=None)
            if (await asyncio.wait([pending], timeout=step))[0]:
                break
            if until is not None and loop.time() >= until:
                raise TimeoutError
            yield _QUEUED
    finally:
        if not pending.done():
            pending.cancel()
    yield pending.result()


async def _anext(stream: Any) -> Chunk:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


async def _cancel(stream: Any) -> None:
    """Serve's ``cancel`` may wait for the call's assignment synchronously: off the event loop."""
    with contextlib.suppress(Exception):  # a call that failed meanwhile has nothing left to cancel
        await asyncio.to_thread(stream.cancel)
