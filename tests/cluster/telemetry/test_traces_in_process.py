"""One trace per request, in this process: front door -> region router -> LocalBackend -> engine stages,
caught by an in-memory exporter. Fast: no Ray; the Ray hops are in test_region_on_ray.py."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cluster.regions.region_client import RegionClient
from cluster.telemetry import spans as S
from cluster.telemetry import tracing

from ..frontdoor.harness import wait_until
from .harness import HEALTH, Region, call, final_of, start_all, tokens_of
from .spans import child, describe, from_sdk, in_trace, named, only, traceparent, within

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exporter():
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))  # synchronous: a span is there once it ends
    tracing.use_provider(provider)
    yield memory
    tracing.shutdown()


@pytest.fixture
def spans(exporter):
    exporter.clear()
    return lambda: [from_sdk(s) for s in exporter.get_finished_spans()]


def settled(spans, trace_id: str, doors: int = 1) -> list:
    """The trace once its front door spans have ended: a door's span ends after its last message
    leaves, so the client can hold its answer a moment before the server's span is done."""
    wait_until(
        lambda: len(named(in_trace(spans(), trace_id), S.FRONTDOOR)) >= doors,
        timeout=10,
        what=f"{doors} front door span(s) of trace {trace_id}",
    )
    return in_trace(spans(), trace_id)


@pytest.fixture
def eu(loop, engines):
    region = Region(loop, engines["eu"], "eu")
    loop.run(region.start())
    yield region
    loop.run(region.stop())


def test_one_trace_covers_every_hop_under_the_callers_traceparent(eu, spans):
    header, trace_id, caller_span = traceparent()
    out = call(eu.port, metadata=(("traceparent", header), ("tracestate", "vendor=x")), max_tokens=6)
    assert len(tokens_of(out)) == 6

    trace = settled(spans, trace_id)
    print(describe(trace))
    door = only(trace, S.FRONTDOOR)
    assert door.parent_id == caller_span and door.kind == "SERVER"  # the caller's span is the parent
    assert door.attributes["rpc.grpc.status_code"] == 0 and door.attributes["levante.region"] == "eu"
    route = child(trace, door, S.REGION_ROUTER)
    attempt = child(trace, route, S.REGION_ATTEMPT)
    assert attempt.attributes["levante.region"] == "eu" and not attempt.error
    local = child(trace, attempt, S.LOCAL_BACKEND)
    assert local.attributes["levante.effort"] == "none" and "levante.effort_reason" in local.attributes
    engine = child(trace, local, S.ENGINE)
    assert engine.attributes["levante.completion_tokens"] == 6
    queue, prefill, decode = (child(trace, engine, n) for n in (S.ENGINE_QUEUE, S.ENGINE_PREFILL, S.ENGINE_DECODE))
    # the stages follow each other inside the engine span, which sits inside its callers'
    assert queue.end_ns == prefill.start_ns and prefill.end_ns == decode.start_ns
    assert queue.start_ns == engine.start_ns and decode.end_ns == engine.end_ns
    for inner, outer in ((engine, local), (local, attempt), (attempt, route), (route, door)):
        assert within(inner, outer, slack_ns=2_000_000), (inner.name, outer.name)  # wall clocks, 2 ms of slack
    assert len(trace) == 8  # nothing else, and nothing twice


def test_a_call_without_traceparent_starts_a_trace_at_the_front_door(eu, spans):
    call(eu.port, max_tokens=3)
    wait_until(lambda: named(spans(), S.FRONTDOOR), timeout=10, what="the front door's span")
    doors = named(spans(), S.FRONTDOOR)
    assert len(doors) == 1 and doors[0].parent_id is None
    trace = in_trace(spans(), doors[0].trace_id)
    assert {s.name for s in trace} >= {S.REGION_ROUTER, S.LOCAL_BACKEND, S.ENGINE_DECODE}


def test_a_refused_call_is_a_failed_server_span(eu, spans):
    header, trace_id, _ = traceparent()

    with pytest.raises(grpc.RpcError) as e:
        call(eu.port, metadata=(("traceparent", header),), max_tokens=0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    door = only(settled(spans, trace_id), S.FRONTDOOR)
    assert door.error and door.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_a_region_failover_shows_in_the_trace(loop, engines, spans):
    """eu's replica breaks after 3 tokens; eu's router resumes the stream in us over gRPC, passing the
    trace context in metadata, so us's spans join the same trace under eu's second attempt."""
    eu = Region(loop, engines["eu"], "eu", peers=("us",), break_after=3)
    us = Region(loop, engines["us"], "us", peers=("eu",))
    start_all(loop, us, eu)
    ports = {"eu": eu.port, "us": us.port}
    try:
        header, trace_id, caller_span = traceparent()
        out = call(ports["eu"], metadata=(("traceparent", header),), max_tokens=10, ignore_eos=True)
    finally:
        loop.run(eu.stop())
        loop.run(us.stop())
    assert len(tokens_of(out)) == 10 and final_of(out).served_by.region == "us"

    trace = settled(spans, trace_id, doors=2)
    print(describe(trace))
    doors = named(trace, S.FRONTDOOR)
    eu_door = next(d for d in doors if d.parent_id == caller_span)
    route = child(trace, eu_door, S.REGION_ROUTER)
    attempts = sorted(named(trace, S.REGION_ATTEMPT), key=lambda s: s.start_ns)
    first, second = [a for a in attempts if a.parent_id == route.span_id]
    assert (first.attributes["levante.region"], second.attributes["levante.region"]) == ("eu", "us")
    # leaving eu: a failed attempt with the reason, the token it left at, and a "region failover" event
    assert first.error and first.attributes["levante.failover.at_token"] == 3
    assert first.attributes["levante.failover.reason"].startswith("unavailable: replica lost (test)")
    event = dict(first.events)[S.REGION_FAILOVER]
    assert event == {
        "levante.from_region": "eu",
        "levante.reason": first.attributes["levante.failover.reason"],
        "levante.at_token": 3,
    }
    assert not second.error and second.attributes["levante.resume_from_token"] == 3
    # us's front door got the context through gRPC metadata: its spans hang under eu's second attempt
    us_door = child(trace, second, S.FRONTDOOR)
    assert us_door.attributes["levante.forwarded_from"] == "eu"
    us_engine = only(trace, S.ENGINE)  # eu's engine span was never made: its stream broke before the end
    assert within(us_engine, us_door, slack_ns=2_000_000)
    assert route.attributes["levante.failovers"] == 1


def test_the_client_library_carries_its_callers_trace_to_the_front_door(eu, loop, spans):
    """An application with a current span calls through RegionClient: the front door's span joins
    that trace, under the client's own attempt span (context passed in gRPC metadata)."""

    async def run():
        app = tracing.start_span("app operation", None)
        token = context.attach(trace.set_span_in_context(app))  # the application's current span
        try:
            async with RegionClient([f"eu=127.0.0.1:{eu.port}"], health=HEALTH) as client:
                return [c async for c in client.generate("Tell me about the sea.", max_tokens=4, temperature=0.0)]
        finally:
            context.detach(token)
            tracing.end_span(app)

    chunks = loop.run(run(), timeout=60)
    assert chunks[-1].finished and chunks[-1].error is None
    app = only(spans(), "app operation")
    trace_spans = settled(spans, app.trace_id)
    print(describe(trace_spans))
    client_route = child(trace_spans, app, S.REGION_ROUTER)  # the client library's own router
    client_attempt = child(trace_spans, client_route, S.REGION_ATTEMPT)
    assert client_attempt.kind == "CLIENT" and client_attempt.attributes["levante.region"] == "eu"
    door = child(trace_spans, client_attempt, S.FRONTDOOR)
    assert door.kind == "SERVER"
    assert {s.name for s in trace_spans} >= {S.LOCAL_BACKEND, S.ENGINE_DECODE}
