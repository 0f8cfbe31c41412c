"""Shedding, not failing: a real front door, a region router over it and a real tiny engine, with clients
that never read. Full answers RESOURCE_EXHAUSTED with a retry hint; busy is never a dead region."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.backends import LocalBackend
from cluster.backends.failover import FailoverBackend
from cluster.config import FrontDoorConfig, HealthCheckConfig, RegionsConfig, TenantConfig
from cluster.frontdoor.shedding import RETRY_AFTER_MS, RETRY_PUSHBACK_MS
from cluster.regions.health_book import HealthBook
from cluster.types import ModelInfo
from engine.api import create_engine
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from levante.v1 import inference_pb2 as pb

from .harness import GENERATE, MODEL, ScriptedBackend, channel, generate, rpc_error, serving, spm_tokenizer, wait_until

pytestmark = pytest.mark.e2e
HEALTH = HealthCheckConfig(consecutive_failures=1, stream_idle_timeout_s=0.6)
# A client that never reads, with a small receive window: the door's writes stop after a few messages
# rather than after the megabytes a default window (grown by BDP probing) would take in.
NOT_READING = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
LONG = pb.GenerateRequest(prompt="Hello there", max_tokens=900, logprobs=20, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_moe):
    eng = create_engine(
        EngineConfig(
            model=ModelConfig(model=tiny_moe, tokenizer=spm_tokenizer()),
            cache=CacheConfig(num_blocks=96),
            scheduler=SchedulerConfig(max_model_len=1000),
        )
    )
    yield eng
    eng.shutdown()


class SlowToAdmit:
    """The engine, but each submit waits ``delay_s`` first: an engine that takes requests only between
    steps, with long steps (a saturated replica)."""

    def __init__(self, engine, delay_s: float = 0.0):
        self.engine, self.delay_s = engine, delay_s

    async def submit(self, *args, **kwargs):
        await asyncio.sleep(self.delay_s)
        await self.engine.submit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@contextlib.contextmanager
def region(loop, engine, config: FrontDoorConfig, delay_s: float = 0.0) -> Iterator[tuple]:
    """A door over a one-region router over the engine, as ``levante serve`` wires it."""
    info = loop.run(engine.info())
    local = LocalBackend(
        SlowToAdmit(engine, delay_s),
        ModelInfo(MODEL, info.max_model_len, info.architecture, info.ep_size),
        "local",
        heartbeat_s=0.2,
    )
    book = HealthBook(HEALTH, ["local"], local="local")
    router = FailoverBackend({"local": local}, book, RegionsConfig(health=HEALTH), local="local")
    with serving(loop, router, config) as door:
        yield door, book


def engine_idle(loop, engine) -> bool:
    """No request left in the engine, and no KV block held: an abort that reached it late has landed too."""
    stats = loop.run(engine.stats())
    return stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0


def open_unread(ch: grpc.Channel, n: int, req: pb.GenerateRequest = LONG) -> list:
    call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
    return [call(req.SerializeToString(), timeout=120) for _ in range(n)]


def hint(err: grpc.RpcError) -> dict[str, str]:
    meta = dict(err.trailing_metadata() or ())
    return {k: meta[k] for k in (RETRY_AFTER_MS, RETRY_PUSHBACK_MS) if k in meta}


def test_forty_unread_streams_then_a_new_caller_gets_resource_exhausted_with_a_retry_hint(loop, engine):
    cfg = FrontDoorConfig(port=0, max_inflight=40, retry_after_ms=750, write_timeout_s=60)
    with (
        region(loop, engine, cfg) as (door, book),
        grpc.insecure_channel(f"localhost:{door.port}", NOT_READING) as lazy,
    ):
        held = open_unread(lazy, 40)
        wait_until(lambda: door._inflight == 40, 30, "40 streams admitted")
        with channel(door) as ch:
            err = rpc_error(lambda: generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=2)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_inflight" in err.details()
        assert hint(err) == {RETRY_AFTER_MS: "750", RETRY_PUSHBACK_MS: "750"}
        assert book.available("local") and not book.transitions  # full, not ejected
        for call in held:
            call.cancel()
        wait_until(lambda: door._inflight == 0 and engine_idle(loop, engine), 30, "cancelled streams freed")


def test_an_engine_slow_to_admit_is_queueing_not_a_dead_region(loop, engine):
    # each submit waits longer than the router's idle limit: heartbeats must say "queued", not "lost"
    with region(loop, engine, FrontDoorConfig(port=0), delay_s=3 * HEALTH.stream_idle_timeout_s) as (door, book):
        with channel(door) as ch:
            for _ in range(2):
                out = generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=2, temperature=0, ignore_eos=True))
                assert out[-1].final.usage.completion_tokens == 2
        assert not book.transitions and book.available("local")


def test_write_timeout_stops_an_unread_stream_and_frees_its_kv_blocks(loop, engine):
    def generated() -> int:
        return loop.run(engine.stats()).num_generated_tokens

    wait_until(lambda: engine_idle(loop, engine), 30, "no other test's request left in the engine")
    before = generated()
    cfg = FrontDoorConfig(port=0, write_timeout_s=0.5, retry_after_ms=100)
    with region(loop, engine, cfg) as (door, _), grpc.insecure_channel(f"localhost:{door.port}", NOT_READING) as lazy:
        (held,) = open_unread(lazy, 1)
        wait_until(lambda: generated() > before, 30, "the stream started")
        wait_until(lambda: door._inflight == 0 and engine_idle(loop, engine), 60, "the unread stream stopped")
        assert generated() - before < LONG.max_tokens  # stopped early: the engine did not write the whole answer
        with pytest.raises(grpc.RpcError) as e:  # reading now: what was queued, then the status
            list(held)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "write_timeout_s" in e.value.details()
        assert hint(e.value)[RETRY_AFTER_MS] == "100"


def _held_backend(loop) -> ScriptedBackend:
    backend = ScriptedBackend()
    backend.hold = loop.run(_event())
    return backend


async def _event() -> asyncio.Event:
    return asyncio.Event()


def _open(ch: grpc.Channel, metadata=()) -> grpc.Future:
    call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
    stream = call(pb.GenerateRequest(prompt="Hi", max_tokens=2).SerializeToString(), timeout=30, metadata=metadata)
    assert next(stream).WhichOneof("kind") == "start"
    return stream


def test_streams_per_connection_are_capped_and_other_connections_still_served(loop):
    backend = _held_backend(loop)
    with serving(loop, backend, FrontDoorConfig(port=0, max_streams_per_connection=2)) as door:
        own_connection = [("grpc.use_local_subchannel_pool", 1)]  # channels to one target share one by default
        with channel(door) as ch, grpc.insecure_channel(f"localhost:{door.port}", own_connection) as other:
            held = [_open(ch), _open(ch)]
            err = rpc_error(lambda: generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=2)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_connection" in err.details() and RETRY_AFTER_MS in hint(err)
            third = _open(other)  # another connection has its own count
            loop.call(backend.hold.set)
            for stream in [*held, third]:
                assert list(stream)[-1].WhichOneof("kind") == "final"
        wait_until(lambda: not door._connections.streams, 10, "per-connection counts released")


def test_maximum_concurrent_rpcs_refuses_every_rpc_beyond_it(loop):
    backend = _held_backend(loop)
    cfg = FrontDoorConfig(port=0, max_inflight=2, maximum_concurrent_rpcs=3)
    with serving(loop, backend, cfg) as door, channel(door) as ch:
        held = [_open(ch), _open(ch)]
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # the third RPC, held open
        err = rpc_error(lambda: ch.unary_unary("/levante.v1.Inference/ListModels")(b"", timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watch.cancel()
        loop.call(backend.hold.set)
        for stream in held:
            assert list(stream)[-1].WhichOneof("kind") == "final"


def test_a_tenant_at_its_concurrency_cap_is_refused_with_a_retry_hint(loop):
    backend = _held_backend(loop)
    tenant = TenantConfig(name="acme", api_key="k1", max_concurrency=1)
    with serving(loop, backend, FrontDoorConfig(port=0, tenants=(tenant,))) as door, channel(door) as ch:
        key = (("authorization", "Bearer k1"),)
        held = _open(ch, key)
        err = rpc_error(lambda: generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=2), metadata=key))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrency" in err.details()
        assert RETRY_AFTER_MS in hint(err)
        loop.call(backend.hold.set)
        assert list(held)[-1].WhichOneof("kind") == "final"
        assert generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=2), metadata=key)[-1].HasField("final")


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"max_inflight": 64, "maximum_concurrent_rpcs": 64}, "maximum_concurrent_rpcs"),
        ({"max_streams_per_connection": -1}, "max_streams_per_connection"),
        ({"write_timeout_s": 0}, "write_timeout_s"),
        ({"retry_after_ms": -1}, "retry_after_ms"),
    ],
)
def test_shedding_fields_are_checked(fields, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        FrontDoorConfig(**fields)
