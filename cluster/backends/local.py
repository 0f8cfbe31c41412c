"""``LocalBackend``: one engine in this process behind the ``Backend`` interface.

For tests, benchmarks and embedding without Ray: the effort decision, the
engine's deltas as chunks, engine errors as chunk errors, and an abort of
the engine request whenever the consumer stops early.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import Span

from cluster.chunks import engine_error_chunk, error_chunk, merge_deltas
from cluster.config import AutoEffortConfig
from cluster.router.policy import decide_for
from cluster.telemetry import spans, tracing
from cluster.types import DEADLINE_EXCEEDED, Backend, Chunk, Decision, GenerateRequest, ModelInfo, ServedBy
from engine.api import EngineClient, EngineError, RequestDelta


class LocalBackend(Backend):
    """Serves ``info.name`` from ``engine``; the engine belongs to the caller, who shuts it down."""

    def __init__(
        self,
        engine: EngineClient,
        info: ModelInfo,
        region: str,
        replica: str = "local-0",
        auto: AutoEffortConfig | None = None,
    ):
        self.engine, self.info, self.auto = engine, info, auto or AutoEffortConfig()
        self.served_by = ServedBy(region, replica)

    def decide(self, request: GenerateRequest) -> Decision:
        """The router's effort policy; one engine has no queue signal of its own here, so load is 0."""
        decision = decide_for(request, queue_delay_s=0.0, cfg=self.auto, now=time.time())
        return dataclasses.replace(decision, replica=self.served_by.replica)

    async def models(self) -> list[ModelInfo]:
        return [self.info]

    async def ready(self) -> bool:
        return await self.engine.health()

    async def replica_statuses(self, timeout_s: float) -> list[dict[str, Any]]:
        """The one engine's figures, in the replicas' status format (for the metrics poller)."""
        del timeout_s  # in-process: answers at once
        healthy = await self.engine.health()
        return [
            {
                "replica": self.served_by.replica,
                "state": "serving" if healthy else "failed",
                "restarts": 0,
                "stats": await self.engine.stats(),
            }
        ]

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self._traced(request) if tracing.active() else self._generate(request, None)

    async def _traced(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """One span for the router's and the replica's part; the engine's stages go below it."""
        span = tracing.start_span(
            spans.LOCAL_BACKEND,
            request.trace_context,
            attributes={"levante.request_id": request.request_id, "levante.replica": self.served_by.replica},
        )
        async with contextlib.aclosing(spans.traced(span, self._generate(request, span))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _generate(self, request: GenerateRequest, span: Span | None) -> AsyncIterator[Chunk]:
        try:
            decision = self.decide(request)
        except ValueError as e:  # an effort the front door let through: still the caller's field
            yield engine_error_chunk(EngineError.from_value_error(e))
            return
        tracing.set_attributes(span, {"levante.effort": decision.effort, "levante.effort_reason": decision.reason})
        params = dataclasses.replace(request.params, reasoning_effort=decision.effort)
        try:
            await self.engine.submit(request.request_id, request.prompt, params, resume=request.resume)
        except EngineError as e:
            yield engine_error_chunk(e)
            return
        finished = False
        stream = aiter(self.engine.stream(request.request_id))
        try:
            # First chunk as soon as the engine took the request: the client learns the decision before prefill ends.
            yield Chunk(decision=decision, served_by=self.served_by)
            while not finished:
                delta = await _next_delta(stream, request.deadline)
                if delta is None:
                    yield error_chunk(DEADLINE_EXCEEDED, "deadline", "passed before the stream finished")
                    return
                finished = delta.finished
                if finished:
                    spans.engine_spans(span, request.request_id, delta.timings, delta.usage, delta.finish_reason)
                yield self._chunk(delta)
        finally:
            if not finished:  # consumer gone, deadline passed, or an error: free the KV blocks now
                await self.engine.abort(request.request_id)
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def _chunk(self, delta: RequestDelta) -> Chunk:
        chunk = merge_deltas([delta])
        chunk.served_by = self.served_by if delta.finished else None
        return chunk


async def _next_delta(stream: AsyncIterator[RequestDelta], deadline: float | None) -> RequestDelta | None:
    """The next delta, or None when the deadline passes first."""
    if deadline is None:
        return await anext(stream)
    try:
        return await asyncio.wait_for(anext(stream), max(0.0, deadline - time.time()))
    except TimeoutError:
        return None
