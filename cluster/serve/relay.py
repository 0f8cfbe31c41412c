"""Relaying a Serve handle's stream of chunks: the one place that turns its failures into chunks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError

from cluster.chunks import error_chunk
from cluster.types import RESOURCE_EXHAUSTED, UNAVAILABLE, Chunk


async def relay(stream: Any, callee: str, idle_timeout_s: float | None) -> AsyncIterator[Chunk]:
    """The chunks of ``stream`` (a streaming DeploymentResponseGenerator) up to the final one.

    A full queue becomes RESOURCE_EXHAUSTED; silence for ``idle_timeout_s`` (the callee sends
    keepalives) or a callee that died becomes UNAVAILABLE naming ``callee``. Leaving early
    cancels the call, and the callee's generator is closed, which aborts the engine request.
    """
    ended = False  # the call is over on its own: nothing to cancel
    try:
        while True:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                ended = True
                return
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


async def _cancel(stream: Any) -> None:
    """Serve's ``cancel`` may wait for the call's assignment synchronously: off the event loop."""
    with contextlib.suppress(Exception):  # a call that failed meanwhile has nothing left to cancel
        await asyncio.to_thread(stream.cancel)
