"""Spans as the tests read them, whichever way they arrived: from an in-memory exporter (this
process) or from the OTLP receiver (the Ray actors' processes)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SpanRecord:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str | None
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[tuple[str, dict[str, Any]], ...] = ()
    resource: dict[str, Any] = field(default_factory=dict)
    error: bool = False


def from_sdk(span: Any) -> SpanRecord:
    """A ReadableSpan (InMemorySpanExporter)."""
    ctx, parent = span.context, span.parent
    return SpanRecord(
        span.name,
        f"{ctx.trace_id:032x}",
        f"{ctx.span_id:016x}",
        f"{parent.span_id:016x}" if parent is not None else None,
        span.kind.name,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        tuple((e.name, dict(e.attributes or {})) for e in span.events),
        dict(span.resource.attributes),
        span.status.status_code.name == "ERROR",
    )


def traceparent() -> tuple[str, str, str]:
    """A caller's W3C traceparent (sampled), with its trace id and span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def in_trace(spans: Iterable[SpanRecord], trace_id: str) -> list[SpanRecord]:
    return [s for s in spans if s.trace_id == trace_id]


def named(spans: Iterable[SpanRecord], name: str) -> list[SpanRecord]:
    return [s for s in spans if s.name == name]


def only(spans: Iterable[SpanRecord], name: str) -> SpanRecord:
    found = named(spans, name)
    assert len(found) == 1, f"expected one {name!r} span, found {len(found)}: {describe(spans)}"
    return found[0]


def children(spans: Iterable[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    return [s for s in spans if s.parent_id == parent.span_id]


def child(spans: list[SpanRecord], parent: SpanRecord, name: str) -> SpanRecord:
    found = named(children(spans, parent), name)
    assert len(found) == 1, f"expected one {name!r} under {parent.name!r}, found {len(found)}: {describe(spans)}"
    return found[0]


def within(inner: SpanRecord, outer: SpanRecord, slack_ns: int = 0) -> bool:
    """``inner`` runs inside ``outer``: for two spans of one process, whose clock reads are ordered."""
    return outer.start_ns - slack_ns <= inner.start_ns <= inner.end_ns <= outer.end_ns + slack_ns


CROSS_PROCESS_SKEW_NS = 50_000_000  # 50 ms: a busy machine may run a process's clock read late by that much


def began_during(inner: SpanRecord, outer: SpanRecord, skew_ns: int = CROSS_PROCESS_SKEW_NS) -> bool:
    """``inner`` (another process's span, the callee) began while ``outer`` (the caller) ran.

    Only the start is causal across processes: the caller ends its span when the last message
    arrives, and the callee ends its own when its generator is closed, which may come later.
    """
    return outer.start_ns - skew_ns <= inner.start_ns <= outer.end_ns + skew_ns


def describe(spans: Iterable[SpanRecord]) -> str:
    """The spans as an indented tree, for failure messages and for the record."""
    spans = list(spans)
    ids = {s.span_id for s in spans}
    lines: list[str] = []

    def walk(s: SpanRecord, depth: int) -> None:
        ms = (s.end_ns - s.start_ns) / 1e6
        where = s.resource.get("levante.component", "")
        lines.append(
            f"{'  ' * depth}{s.name} [{where}] {ms:.2f} ms{' ERROR' if s.error else ''}"
            + "".join(f" <{e[0]}>" for e in s.events)
        )
        for c in sorted(children(spans, s), key=lambda c: c.start_ns):
            walk(c, depth + 1)

    for root in sorted((s for s in spans if s.parent_id not in ids), key=lambda s: s.start_ns):
        walk(root, 0)
    return os.linesep + os.linesep.join(lines)
