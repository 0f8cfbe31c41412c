"""A bounded load test on loopback: 200 concurrent streams for 30 s against a real front door, its region
router and a real tiny engine. A quarter are cancelled part way, a quarter never read. Afterwards nothing
is left over (KV blocks, in-flight counts, per-connection counts, tasks) and every finished stream is whole.

The 30 s is how long the load runs, not a bound on anything; a busy machine just gets fewer streams done.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from cluster.backends.failover import FailoverBackend
from cluster.config import FrontDoorConfig, HealthCheckConfig, RegionsConfig, TenantConfig
from cluster.regions.health_book import HealthBook
from engine.api import create_engine
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from levante.v1 import inference_pb2 as pb

from .harness import GENERATE, LoopThread, engine_backend, generate, serving, spm_tokenizer, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
STREAMS, LOAD_S = 200, 30.0
CHANNELS = 8  # connections the readers share (25 streams each, under max_streams_per_connection)
KEY = "load-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
PROMPTS = ("Hello there", "The capital of France is", "Once upon a time", "1, 2, 3,")
MAX_TOKENS = (4, 12)
NOT_READING = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024), ("grpc.use_local_subchannel_pool", 1)]
UNREAD = pb.GenerateRequest(prompt="Never read", max_tokens=600, logprobs=20, ignore_eos=True, temperature=0)


def request(prompt: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)


@dataclass
class Tally:
    whole: int = 0
    cancelled: int = 0
    unread: int = 0
    refused: list[str] = field(default_factory=list)  # RESOURCE_EXHAUSTED details: shedding, allowed
    broken: list[str] = field(default_factory=list)  # anything else: a failure


@pytest.fixture(scope="module")
def engine(tiny_moe):
    eng = create_engine(
        EngineConfig(
            model=ModelConfig(model=tiny_moe, tokenizer=spm_tokenizer()),
            cache=CacheConfig(num_blocks=512),
            scheduler=SchedulerConfig(max_model_len=1000, max_num_seqs=64),
        )
    )
    yield eng
    eng.shutdown()


@contextlib.contextmanager
def region(loop: LoopThread, engine) -> Iterator:
    # The door, the router and the engine's callbacks share one event loop here, and on two busy cores it
    # can stall past the default 1.5 s idle limit: this test is about leaks and whole streams, not liveness.
    health = HealthCheckConfig(stream_idle_timeout_s=15.0)
    local = engine_backend(loop, engine, "local")
    book = HealthBook(health, ["local"], local="local")
    router = FailoverBackend({"local": local}, book, RegionsConfig(health=health), local="local")
    cfg = FrontDoorConfig(port=0, tenants=(TenantConfig(name="load", api_key=KEY),), write_timeout_s=1.0)
    with serving(loop, router, cfg) as door:
        yield door, book


async def _read(ch: grpc.aio.Channel, req: pb.GenerateRequest, expected: list[int], tally: Tally) -> None:
    tokens, final = [], None
    async for response in ch.unary_stream(GENERATE)(req.SerializeToString(), timeout=120, metadata=AUTH):
        message = pb.GenerateResponse.FromString(response)
        tokens += message.delta.token_ids if message.HasField("delta") else []
        final = message.final if message.HasField("final") else final
    if final is None or final.usage.completion_tokens != len(tokens) or tokens != expected:
        tally.broken.append(f"{req.prompt!r}/{req.max_tokens}: {len(tokens)} tokens, final {final is not None}")
    else:
        tally.whole += 1


async def _cancel(ch: grpc.aio.Channel, req: pb.GenerateRequest, after: int, tally: Tally) -> None:
    call = ch.unary_stream(GENERATE)(req.SerializeToString(), timeout=120, metadata=AUTH)
    for _ in range(after):
        if await call.read() is grpc.aio.EOF:
            break
    call.cancel()
    tally.cancelled += 1


async def _unread(ch: grpc.aio.Channel, tally: Tally) -> None:
    call = ch.unary_stream(GENERATE)(UNREAD.SerializeToString(), timeout=120, metadata=AUTH)
    await asyncio.sleep(2.0)  # past the door's write timeout: it stopped the stream; we go away
    call.cancel()
    tally.unread += 1


async def _worker(i: int, readers: list, lazy: grpc.aio.Channel, reference: dict, until: float, tally: Tally):
    cases = itertools.cycle(itertools.product(PROMPTS, MAX_TOKENS))
    for _ in range(i):
        next(cases)
    while time.monotonic() < until:
        prompt, max_tokens = next(cases)
        req = request(prompt, max_tokens)
        try:
            if i % 4 == 2:
                await _cancel(readers[i % CHANNELS], req, 1 + i % 3, tally)
            elif i % 4 == 3:
                await _unread(lazy, tally)
            else:
                await _read(readers[i % CHANNELS], req, reference[prompt, max_tokens], tally)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.broken.append(f"{prompt!r}/{max_tokens}: {e.code().name}: {e.details()}")
                continue
            tally.refused.append(e.details())
            await asyncio.sleep(int(dict(e.trailing_metadata() or ()).get("retry-after-ms", "100")) / 1000)


async def _load(port: int, reference: dict) -> Tally:
    tally = Tally()
    target = f"localhost:{port}"
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel, as separate clients would have
    readers = [grpc.aio.insecure_channel(target, own) for _ in range(CHANNELS)]
    lazy = grpc.aio.insecure_channel(target, NOT_READING)
    until = time.monotonic() + LOAD_S
    try:
        await asyncio.gather(*(_worker(i, readers, lazy, reference, until, tally) for i in range(STREAMS)))
    finally:
        for ch in [*readers, lazy]:
            await ch.close()
    return tally


async def _tasks() -> int:
    return len(asyncio.all_tasks())


def test_two_hundred_streams_for_thirty_seconds_leave_nothing_behind(loop, engine):
    with region(loop, engine) as (door, book):
        with grpc.insecure_channel(f"localhost:{door.port}") as ch:
            reference = {
                (p, n): [t for r in generate(ch, request(p, n), metadata=AUTH) for t in r.delta.token_ids]
                for p, n in itertools.product(PROMPTS, MAX_TOKENS)
            }
        tasks_before = loop.run(_tasks())
        clients = LoopThread()  # the clients' own event loop, as another process's would be
        try:
            tally = clients.run(_load(door.port, reference), timeout=LOAD_S + 150)
        finally:
            clients.close()
        print(
            f"load: {tally.whole} whole, {tally.cancelled} cancelled, {tally.unread} unread, "
            f"{len(tally.refused)} refused"
        )

        def idle() -> bool:
            stats = loop.run(engine.stats())
            return door._inflight == 0 and stats.num_used_blocks == 0 and stats.num_running + stats.num_waiting == 0

        wait_until(idle, 60, "the door and the engine idle")
        assert not tally.broken, tally.broken[:5]
        assert tally.whole and tally.cancelled and tally.unread
        assert door._tenants.authenticate(AUTH).inflight == 0
        assert not door._connections.streams
        wait_until(lambda: loop.run(_tasks()) <= tasks_before, 30, "the door's tasks back to what they were")
        assert not book.transitions  # the region was busy, never ejected
