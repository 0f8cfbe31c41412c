"""One Generate call at the front door: its server span and its metrics.

The front door makes a ``CallTelemetry`` per call only when tracing or metrics are on; with both
off it makes none and reads no trace headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from cluster.telemetry import spans, tracing
from cluster.telemetry.metrics import ServerMetrics
from cluster.types import FORWARDED_FROM, Chunk, GenerateRequest

SERVICE, METHOD = spans.FRONTDOOR.split("/")


class CallTelemetry:
    def __init__(self, metrics: ServerMetrics | None, metadata: Mapping[str, str], region: str) -> None:
        # the caller's traceparent/tracestate, if any, is the parent (W3C trace context in gRPC metadata)
        self.span = tracing.start_span(
            spans.FRONTDOOR,
            metadata,
            SpanKind.SERVER,
            {
                "rpc.system": "grpc",
                "rpc.service": SERVICE,
                "rpc.method": METHOD,
                "levante.region": region,
                "levante.forwarded_from": metadata.get(FORWARDED_FROM),
            },
        )
        self.observer = metrics.call() if metrics is not None else None

    def carrier(self) -> dict[str, str] | None:
        """This call's span context, for the request to carry to the next hop."""
        return tracing.carrier_of(self.span)

    def admitted(self, request: GenerateRequest) -> None:
        """The call is a valid request now."""
        tracing.set_attributes(
            self.span,
            {
                "levante.request_id": request.request_id,
                "levante.tenant": request.tenant,
                "levante.requested_effort": request.reasoning_effort,
                "levante.resume_from_token": len(request.resume.token_ids) if request.resume else None,
            },
        )
        if self.observer is not None:
            self.observer.requested = request.reasoning_effort

    def chunk(self, chunk: Chunk) -> None:
        if self.observer is not None:
            self.observer.chunk(chunk)
        if self.span is not None and chunk.decision is not None:
            tracing.set_attributes(
                self.span, {"levante.effort": chunk.decision.effort, "levante.replica": chunk.decision.replica}
            )
        if self.span is not None and chunk.finished and chunk.served_by is not None:
            tracing.set_attributes(
                self.span,
                {
                    "levante.served_by.region": chunk.served_by.region,
                    "levante.served_by.replica": chunk.served_by.replica,
                    "levante.failovers": len(chunk.failovers or []),
                },
            )

    def done(self, code: str, details: str | None) -> None:
        if self.observer is not None:
            self.observer.done(code)
        if self.span is not None:
            self.span.set_attribute("rpc.grpc.status_code", _CODE_VALUES.get(code, 2))
            tracing.end_span(self.span, None if code == "OK" else f"{code}: {details or ''}")


_CODE_VALUES = {c.name: c.value[0] for c in grpc.StatusCode}


def call_code(context: grpc.aio.ServicerContext, failure: BaseException | None) -> tuple[str, str | None]:
    """How the call ended, as a gRPC status name and its details."""
    code: Any = context.code()  # set by context.abort
    if code is not None:
        return code.name, context.details()
    if failure is None:
        return "OK", None
    if isinstance(failure, asyncio.CancelledError):  # the client left, or its deadline passed
        remaining = context.time_remaining()
        return ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"), None
    return "UNKNOWN", repr(failure)
