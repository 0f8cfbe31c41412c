"""One request against an ``EngineClient``, as chunks: the pipeline the local backend and the replica share.

Submit, a first chunk as soon as the engine took the request (the caller learns who serves it before
prefill ends), the engine's deltas grouped into chunks, engine errors as error chunks, the engine's
stage spans under the caller's span, and an abort whenever the stream ends early (the consumer left,
the deadline passed, an error): the KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry.trace import Span

from cluster.chunks import engine_error_chunk, error_chunk, merge_deltas
from cluster.telemetry import spans
from cluster.types import DEADLINE_EXCEEDED, INVALID_ARGUMENT, Chunk, GenerateRequest, ServedBy
from engine.config import EFFORTS
from engine.types import EngineClient, EngineError, RequestDelta, SamplingParams


@dataclass(frozen=True)
class Batching:
    """How deltas become chunks: the first token goes alone, at once; later chunks close at
    ``max_tokens`` tokens or ``max_wait_s`` after their first delta. Prefill progress goes out at most
    once per ``max_wait_s`` (the latest report). With nothing for ``keepalive_s`` (a queue, a prefill
    step longer than that) an empty chunk goes out, so the caller can tell slow from lost."""

    max_tokens: int = 1
    max_wait_s: float = 0.0
    keepalive_s: float | None = None


async def run_request(
    engine: EngineClient,
    request: GenerateRequest,
    served_by: ServedBy,
    span: Span | None = None,
    batching: Batching = Batching(),
) -> AsyncIterator[Chunk]:
    """The chunks of ``request`` on ``engine``; every chunk that can end the stream names ``served_by``."""
    if request.reasoning_effort not in EFFORTS:  # the router decides AUTO before a request gets here
        yield _by(
            error_chunk(INVALID_ARGUMENT, "reasoning_effort", f"undecided: {request.reasoning_effort!r}"), served_by
        )
        return
    params = dataclasses.replace(request.params, reasoning_effort=request.reasoning_effort)
    try:
        async with contextlib.aclosing(_submit(engine, request, params, served_by, batching.keepalive_s)) as waiting:
            async for keepalive in waiting:
                yield keepalive
    except EngineError as e:
        yield _by(engine_error_chunk(e), served_by)
        return
    deltas: asyncio.Queue[RequestDelta] = asyncio.Queue()
    pump = asyncio.create_task(_pump(engine, request.request_id, deltas))
    engine_done = False  # the engine finished the request itself: nothing to abort
    try:
        yield Chunk(served_by=served_by)
        wait_s = 0.0  # until the first token: it goes alone, at once
        while True:
            chunk, last = await _next_chunk(deltas, request.deadline, batching, wait_s)
            if chunk.token_ids:
                wait_s = batching.max_wait_s
            if last is not None and last.finished:
                engine_done = True
                spans.engine_spans(span, request.request_id, last.timings, last.usage, last.finish_reason)
            if chunk.finished:
                yield _by(chunk, served_by)
                return
            yield chunk
    finally:
        pump.cancel()
        if not engine_done:
            await engine.abort(request.request_id)
        with contextlib.suppress(asyncio.CancelledError):
            await pump


async def _submit(
    engine: EngineClient,
    request: GenerateRequest,
    params: SamplingParams,
    served_by: ServedBy,
    keepalive_s: float | None,
) -> AsyncIterator[Chunk]:
    """Submits ``request``; a keepalive every ``keepalive_s`` until the engine took it. An engine takes
    requests between steps, and a busy one's steps are long: that wait is queueing, not silence, and a
    region router would otherwise take the busy region for a lost one. Raises the engine's refusal.
    Closed before the engine answered, it aborts the request, which the engine may still take."""
    submit = asyncio.ensure_future(engine.submit(request.request_id, request.prompt, params, resume=request.resume))
    try:
        while not (await asyncio.wait([submit], timeout=keepalive_s))[0]:
            yield Chunk(served_by=served_by)  # who has it, as the first chunk after submit says
    finally:
        if not submit.done():
            submit.cancel()
            await engine.abort(request.request_id)
    submit.result()


def _by(chunk: Chunk, served_by: ServedBy) -> Chunk:
    chunk.served_by = served_by
    return chunk


async def _pump(engine: EngineClient, request_id: str, deltas: asyncio.Queue[RequestDelta]) -> None:
    try:
        async for delta in engine.stream(request_id):
            deltas.put_nowait(delta)
    except Exception:  # noqa: BLE001 -- a stream that breaks ends the request as the engine's abort would
        await engine.abort(request_id)
        deltas.put_nowait(RequestDelta(request_id, [], finished=True, finish_reason="abort"))


async def _next_chunk(
    deltas: asyncio.Queue[RequestDelta], deadline: float | None, batching: Batching, wait_s: float
) -> tuple[Chunk, RequestDelta | None]:
    """The next chunk and its last delta: waits for one delta (a keepalive or the deadline may come
    first), then takes more for up to ``wait_s`` or ``batching.max_tokens`` tokens. A progress report
    waits up to ``batching.max_wait_s`` for later ones, unless the first token comes: that goes at once."""
    left = None if deadline is None else max(0.0, deadline - time.time())
    timeout = min((t for t in (left, batching.keepalive_s) if t is not None), default=None)
    try:
        async with asyncio.timeout(timeout):
            first = await deltas.get()
    except TimeoutError:
        if deadline is not None and time.time() >= deadline:
            return error_chunk(DEADLINE_EXCEEDED, "deadline", "passed before the stream finished"), None
        return Chunk(), None  # keepalive
    got = [first]
    until = asyncio.get_running_loop().time() + (wait_s if first.token_ids else batching.max_wait_s)
    num_tokens = len(first.token_ids)
    while not got[-1].finished and num_tokens < batching.max_tokens and not (num_tokens and wait_s == 0):
        more = await _next_within(deltas, until)
        if more is None:
            break
        got.append(more)
        num_tokens += len(more.token_ids)
    return merge_deltas(got), got[-1]


async def _next_within(deltas: asyncio.Queue[RequestDelta], until: float) -> RequestDelta | None:
    if not deltas.empty():
        return deltas.get_nowait()
    left = until - asyncio.get_running_loop().time()
    if left <= 0:
        return None
    try:
        async with asyncio.timeout(left):
            return await deltas.get()
    except TimeoutError:
        return None
