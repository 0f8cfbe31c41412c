"""OpenTelemetry tracing for each process of a region: a provider from config, spans made by hand.

Every process that emits spans (the front door's, the Router and EngineReplica replicas, rank 0's
actor) calls ``setup_tracing`` with the config it already receives. Off (the default) nothing is
installed: the OpenTelemetry API stays its no-op, ``active()`` is False, and each hop skips its
spans and carries no trace context, so a request pays one boolean test per hop.

Spans are started and ended explicitly, each with its parent passed in (a W3C carrier dict or a
span), never through the ambient context: a request crosses async generators, Ray calls and gRPC,
and the carrier in ``GenerateRequest.trace_context`` (``traceparent``/``tracestate``) is what
links its hops. Engine stages are spans with explicit start and end times (cluster/telemetry/spans.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import inject as inject_ambient
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cluster.config import TracingConfig

log = logging.getLogger(__name__)

Carrier = dict[str, str]  # W3C trace context: "traceparent" and, when set, "tracestate"
TRACE_HEADERS = ("traceparent", "tracestate")  # the gRPC metadata keys that carry it
INSTRUMENTATION = "levante"

_PROPAGATOR = TraceContextTextMapPropagator()


class _Installed:
    def __init__(self, provider: Any, key: object) -> None:
        self.provider, self.key = provider, key
        self.tracer = provider.get_tracer(INSTRUMENTATION)


_installed: _Installed | None = None


def setup_tracing(cfg: TracingConfig, region: str, component: str) -> bool:
    """Install a provider exporting to ``cfg.otlp_endpoint`` (once per process and config); False when off."""
    if not cfg.enabled:
        return False
    key = (cfg, region, component)
    if _installed is not None and _installed.key == key:
        return True
    # Imported here: a process with tracing off never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create(
        {
            "service.name": cfg.service_name,
            "service.version": package_version(),
            "levante.region": region,
            "levante.component": component,
        }
    )
    # ParentBased: a caller's sampled flag (traceparent) decides for its trace; the ratio only for new ones.
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
    exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=cfg.export_interval_s * 1000))
    use_provider(provider, key)
    log.info("tracing: %s (%s in %s) exports to %s", cfg.service_name, component, region, cfg.otlp_endpoint)
    return True


def use_provider(provider: Any, key: object = None) -> None:
    """Send this process's spans to ``provider`` (tests pass one with an in-memory exporter)."""
    global _installed
    shutdown()
    _installed = _Installed(provider, key)
    # Also the process-wide provider, for other instrumentation, the first time (the API allows one).
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)


def shutdown() -> None:
    """Flush and stop our provider; spans after this are not recorded."""
    global _installed
    if _installed is not None:
        installed, _installed = _installed, None
        try:
            installed.provider.shutdown()
        except Exception:
            log.warning("tracing: shutting the provider down failed", exc_info=True)


def flush(timeout_s: float = 5.0) -> bool:
    return _installed is None or _installed.provider.force_flush(int(timeout_s * 1000))


def active() -> bool:
    return _installed is not None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("levante")
    except PackageNotFoundError:
        return "unknown"


# ---- carriers ------------------------------------------------------------------------------------


def context_of(parent: Span | Mapping[str, str] | None) -> Context | None:
    """The OpenTelemetry context a child of ``parent`` (a span, or a carrier / gRPC metadata dict) starts in."""
    if parent is None:
        return None
    if isinstance(parent, Span):
        return trace.set_span_in_context(parent)
    return _PROPAGATOR.extract(parent)


def carrier_of(span: Span | None) -> Carrier | None:
    """``span``'s W3C trace context, for the next hop (None without a span)."""
    if span is None:
        return None
    carrier: Carrier = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier or None


def ambient_carrier() -> Carrier | None:
    """The caller's current trace context, whatever provider it uses (the client library's callers)."""
    carrier: Carrier = {}
    inject_ambient(carrier)  # writes nothing when there is no current span
    return carrier or None


def grpc_metadata(carrier: Mapping[str, str] | None) -> list[tuple[str, str]]:
    return [(k, carrier[k]) for k in TRACE_HEADERS if carrier and k in carrier]


# ---- spans ---------------------------------------------------------------------------------------


def start_span(
    name: str,
    parent: Span | Mapping[str, str] | None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_time: float | None = None,
) -> Span | None:
    """A span that the caller ends with ``end_span``; None when tracing is off.

    ``start_time`` in ``time.time()`` seconds, for stages measured elsewhere (the engine's).
    """
    if _installed is None:
        return None
    return _installed.tracer.start_span(
        name,
        context=context_of(parent),
        kind=kind,
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
        start_time=None if start_time is None else _ns(start_time),
    )


def end_span(span: Span | None, error: str | None = None, end_time: float | None = None) -> None:
    """End ``span``; ``error`` set marks it failed with that description."""
    if span is None:
        return
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=None if end_time is None else _ns(end_time))


def set_attributes(span: Span | None, attributes: Mapping[str, Any]) -> None:
    """Set what is known (None values are skipped)."""
    if span is not None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
