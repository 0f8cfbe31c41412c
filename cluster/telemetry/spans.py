"""The spans each hop makes, by name, and the two that take more than a line: the region router's
(one child per region attempt, an event when it leaves a region) and the engine's stages (made after
the fact from ``RequestTimings``, so the engine itself stays free of OpenTelemetry).

A trace of one request (docs/observability.md):

    levante.v1.Inference/Generate        front door, SERVER, parent: the caller's traceparent
      levante.region_router               the region router (cluster/backends/failover.py)
        levante.region_attempt            one per region tried, CLIENT; event "region failover" when left
          levante.router                  the replica router in the front door (effort, replica), CLIENT
            levante.replica               the EngineReplica (rank 0), SERVER, across the one Ray hop
              levante.engine              its engine, from the request's timings
                levante.engine.queue / .prefill / .decode
          (a peer region: its own levante.v1.Inference/Generate, through gRPC metadata)

In-process (``LocalBackend``) ``levante.local_backend`` stands for the router and the replica.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from opentelemetry.trace import Span, SpanKind

from cluster.telemetry import tracing
from cluster.types import Chunk, FailoverHop, GenerateRequest
from engine.types import RequestTimings, Usage

log = logging.getLogger(__name__)

FRONTDOOR = "levante.v1.Inference/Generate"
REGION_ROUTER = "levante.region_router"
REGION_ATTEMPT = "levante.region_attempt"
REGION_FAILOVER = "region failover"  # an event on the attempt span of the region it left
ROUTER = "levante.router"
REPLICA = "levante.replica"
LOCAL_BACKEND = "levante.local_backend"
ENGINE = "levante.engine"
ENGINE_QUEUE, ENGINE_PREFILL, ENGINE_DECODE = "levante.engine.queue", "levante.engine.prefill", "levante.engine.decode"


def error_of(chunk: Chunk) -> str | None:
    return None if chunk.error is None else f"{chunk.error.code}: {chunk.error.details}"


async def traced(
    span: Span | None, chunks: AsyncIterator[Chunk], before_end: Callable[[str | None], None] | None = None
) -> AsyncIterator[Chunk]:
    """``chunks`` passed on; then ``span`` ends, failed with the final chunk's error or as closed early
    (``before_end`` gets that error first, for spans of its own)."""
    error: str | None = "closed before the final chunk"
    try:
        async with contextlib.aclosing(chunks) as inner:
            async for chunk in inner:
                if chunk.finished:
                    error = error_of(chunk)
                yield chunk
    finally:
        if before_end is not None:
            before_end(error)
        tracing.end_span(span, error)


def traced_hop(
    name: str,
    request: GenerateRequest,
    attributes: Mapping[str, Any],
    body: Callable[[Span | None], AsyncIterator[Chunk]],
    kind: SpanKind = SpanKind.INTERNAL,
) -> AsyncIterator[Chunk]:
    """``body(span)``'s chunks inside one span named ``name``, a child of the request's trace context;
    with tracing off, ``body(None)`` as it is."""
    if not tracing.active():
        return body(None)
    span = tracing.start_span(
        name, request.trace_context, kind, {"levante.request_id": request.request_id, **attributes}
    )
    return traced(span, body(span))


# ---- the engine's stages -------------------------------------------------------------------------


def engine_spans(
    parent: Span | Mapping[str, str] | None,
    request_id: str,
    timings: RequestTimings | None,
    usage: Usage | None,
    finish_reason: str | None,
) -> None:
    """``levante.engine`` and its queue, prefill and decode children, with the times the engine recorded.

    Called where a request's final delta passes (``run_request``): it never raises,
    so a tracing fault cannot hold back the delta that ends a stream.
    """
    if not tracing.active() or parent is None or timings is None:
        return
    try:
        _engine_spans(parent, request_id, timings, usage, finish_reason)
    except Exception:
        log.warning("tracing: could not record the engine spans of %s", request_id, exc_info=True)


def _engine_spans(
    parent: Span | Mapping[str, str],
    request_id: str,
    timings: RequestTimings,
    usage: Usage | None,
    finish_reason: str | None,
) -> None:
    attributes = {
        "levante.request_id": request_id,
        "levante.finish_reason": finish_reason,
        "levante.preemptions": timings.num_preemptions,
    }
    if usage is not None:
        attributes.update(
            {
                "levante.prompt_tokens": usage.prompt_tokens,
                "levante.completion_tokens": usage.completion_tokens,
                "levante.reasoning_tokens": usage.reasoning_tokens,
                "levante.cached_tokens": usage.cached_tokens,
                "levante.effort": usage.reasoning_effort,
            }
        )
    engine = tracing.start_span(ENGINE, parent, attributes=attributes, start_time=timings.arrival)
    stages = [(ENGINE_QUEUE, timings.arrival, timings.first_scheduled)]
    if timings.first_scheduled is not None:
        stages.append((ENGINE_PREFILL, timings.first_scheduled, timings.first_token))
    if timings.first_token is not None:
        stages.append((ENGINE_DECODE, timings.first_token, None))
    for name, start, end in stages:  # a stage still under way when the request ended ends with it
        tracing.end_span(tracing.start_span(name, engine, start_time=start), end_time=end or timings.finished)
    tracing.end_span(engine, error="abort" if finish_reason == "abort" else None, end_time=timings.finished)


# ---- the region router ---------------------------------------------------------------------------


class RouteTrace:
    """The region router's spans for one request: the route, and one child per region attempt."""

    def __init__(self, request: GenerateRequest) -> None:
        self.span = tracing.start_span(
            REGION_ROUTER,
            request.trace_context,
            attributes={"levante.request_id": request.request_id, "levante.preferred_region": request.preferred_region},
        )
        self._attempt: Span | None = None
        self._failovers = 0

    def attempt(self, region: str, index: int, request: GenerateRequest) -> GenerateRequest:
        """``request`` as sent to ``region``: carrying its attempt span's context."""
        self._end_attempt("superseded")
        resumed = len(request.resume.token_ids) if request.resume is not None else 0
        self._attempt = tracing.start_span(
            REGION_ATTEMPT,
            self.span,
            SpanKind.CLIENT,
            {"levante.region": region, "levante.attempt": index, "levante.resume_from_token": resumed},
        )
        return dataclasses.replace(request, trace_context=tracing.carrier_of(self._attempt))

    def failover(self, hop: FailoverHop) -> None:
        """The request left ``hop.from_region``: an event and attributes on its attempt, which ends failed."""
        self._failovers += 1
        details = {
            "levante.from_region": hop.from_region,
            "levante.reason": hop.reason,
            "levante.at_token": hop.at_token,
        }
        if self._attempt is not None:
            self._attempt.add_event(REGION_FAILOVER, details)
            tracing.set_attributes(
                self._attempt, {"levante.failover.reason": hop.reason, "levante.failover.at_token": hop.at_token}
            )
        self._end_attempt(hop.reason)

    def wrap(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """``chunks`` passed on; the spans end with the stream (the error of its final chunk, if any)."""

        def before_end(error: str | None) -> None:
            self._end_attempt(error)
            tracing.set_attributes(self.span, {"levante.failovers": self._failovers})

        return traced(self.span, chunks, before_end)

    def _end_attempt(self, error: str | None) -> None:
        if self._attempt is not None:
            tracing.end_span(self._attempt, error)
            self._attempt = None


class _NoRouteTrace:
    """Tracing off: the same calls, doing nothing."""

    def attempt(self, region: str, index: int, request: GenerateRequest) -> GenerateRequest:
        return request

    def failover(self, hop: FailoverHop) -> None:
        pass


NO_ROUTE_TRACE = _NoRouteTrace()


AnyRouteTrace = RouteTrace | _NoRouteTrace


def route_trace(request: GenerateRequest) -> AnyRouteTrace:
    return RouteTrace(request) if tracing.active() else NO_ROUTE_TRACE
