"""A small OTLP/gRPC trace receiver for tests: what a collector would get from every process.

Spans made in Ray actors (the EngineReplica replicas) never reach an in-memory
exporter in the test process; they reach this, over the same OTLP exporter production uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from .spans import SpanRecord


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


def _attributes(kvs) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def _record(span: trace_pb2.Span, resource: dict[str, Any]) -> SpanRecord:
    kind = trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_")
    return SpanRecord(
        span.name,
        span.trace_id.hex(),
        span.span_id.hex(),
        span.parent_span_id.hex() or None,
        kind,
        span.start_time_unix_nano,
        span.end_time_unix_nano,
        _attributes(span.attributes),
        tuple((e.name, _attributes(e.attributes)) for e in span.events),
        resource,
        span.status.code == trace_pb2.Status.STATUS_CODE_ERROR,
    )


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._spans: list[SpanRecord] = []
        self._lock = threading.Lock()
        self.exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context) -> Any:
        received = []
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                received.extend(_record(s, resource) for s in ss.spans)
        with self._lock:
            self._spans.extend(received)
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[SpanRecord]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, done: Callable[[list[SpanRecord]], bool], timeout_s: float, what: str) -> list[SpanRecord]:
        end = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if done(spans):
                return spans
            if time.monotonic() > end:
                raise AssertionError(
                    f"no {what} within {timeout_s:g}s; received {len(spans)} span(s) in {self.exports} export(s)"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        self._server.stop(grace=None)
