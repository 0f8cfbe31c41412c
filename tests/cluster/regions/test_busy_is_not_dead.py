"""A busy region is not a dead one: the ejection cap, and RESOURCE_EXHAUSTED never counted against health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cluster.backends.failover import FailoverBackend
from cluster.chunks import error_chunk
from cluster.config import HealthCheckConfig, RegionsConfig
from cluster.regions.health_book import EJECTED, HEALTHY, HealthBook
from cluster.types import RESOURCE_EXHAUSTED, UNAVAILABLE, Backend, Chunk, GenerateRequest, ModelInfo
from engine.types import SamplingParams

EJECT_AT_ONCE = HealthCheckConfig(consecutive_failures=1, stream_idle_timeout_s=0.3)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def book(*regions: str, **cfg) -> HealthBook:
    return HealthBook(HealthCheckConfig(consecutive_failures=1, **cfg), regions, local=regions[0], clock=Clock())


def ejected(b: HealthBook) -> set[str]:
    return {t.region for t in b.transitions if t.state == EJECTED}


def test_the_only_region_is_never_ejected():
    b = book("local")
    for _ in range(10):
        b.on_failure("local", "timeout: no chunk or heartbeat within 1.5s")
    assert b.available("local") and not b.transitions


def test_the_last_region_that_takes_traffic_is_never_ejected():
    b = book("eu", "us")
    b.on_failure("eu", "unavailable")
    assert ejected(b) == {"eu"}
    for _ in range(5):
        b.on_failure("us", "unavailable")
    assert ejected(b) == {"eu"} and b.available("us")


def test_an_unhealthy_peer_does_not_count_as_taking_traffic():
    b = book("eu", "us", unhealthy_threshold=1)
    b.on_check("us", False, reason="timeout")
    b.on_failure("eu", "unavailable")
    assert not ejected(b) and b.available("eu")


def test_at_most_max_ejection_percent_of_the_regions_are_out_at_once():
    b = book("a", "b", "c", "d", max_ejection_percent=50)
    for name in "abcd":
        b.on_failure(name, "unavailable")
    assert ejected(b) == {"a", "b"}
    assert b.available("c") and b.available("d")


def test_one_ejection_is_allowed_even_at_zero_percent():
    b = book("a", "b", "c", max_ejection_percent=0)
    for name in "abc":
        b.on_failure(name, "unavailable")
    assert ejected(b) == {"a"}


def test_a_held_back_ejection_happens_once_another_region_is_back():
    b = book("eu", "us", base_ejection_s=5, max_ejection_s=5)
    b.on_failure("eu", "unavailable")
    b.on_failure("us", "unavailable")  # held back: eu is out
    b.clock.now = 6  # eu's ejection ran out
    b.on_failure("us", "unavailable")
    assert [t.region for t in b.transitions if t.state == EJECTED] == ["eu", "us"]


def test_max_ejection_percent_is_checked():
    with pytest.raises(ValueError, match="max_ejection_percent"):
        HealthCheckConfig(max_ejection_percent=101)


class Always(Backend):
    """Answers every call with one error chunk."""

    def __init__(self, code: str):
        self.code, self.calls = code, 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.calls += 1
        yield error_chunk(self.code, "queue" if self.code == RESOURCE_EXHAUSTED else "replica", "scripted")

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo("m", 64)]

    async def ready(self) -> bool:
        return True


def run(members: dict[str, Backend], times: int = 1) -> tuple[list[Chunk], HealthBook]:
    b = HealthBook(EJECT_AT_ONCE, members, local="eu")
    fb = FailoverBackend(members, b, RegionsConfig(health=EJECT_AT_ONCE), local="eu")
    request = GenerateRequest("t/1", "m", "hi", SamplingParams(max_tokens=4))

    async def collect() -> list[Chunk]:
        out: list[Chunk] = []
        for _ in range(times):
            out = [c async for c in fb.generate(request)]
        return out

    return asyncio.run(collect()), b


def test_a_full_region_is_never_ejected_however_often_it_is_full():
    chunks, b = run({"eu": Always(RESOURCE_EXHAUSTED), "us": Always(RESOURCE_EXHAUSTED)}, times=5)
    assert chunks[-1].error.code == RESOURCE_EXHAUSTED
    assert not b.transitions and b.regions["eu"].state(b.clock()) != EJECTED


def test_full_here_and_down_there_answers_busy_not_dead():
    chunks, b = run({"eu": Always(RESOURCE_EXHAUSTED), "us": Always(UNAVAILABLE)})
    error = chunks[-1].error
    assert error.code == RESOURCE_EXHAUSTED and "no region has room" in error.message
    assert ejected(b) == {"us"} and b.regions["eu"].state(b.clock()) in (HEALTHY, "unknown")


class Endless(Backend):
    """Chunks as fast as the loop turns, until closed; counts the streams still running."""

    def __init__(self) -> None:
        self.running = 0
        self.stop = False  # ends a stream whose cancel was lost, so the test can finish

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.running += 1
        try:
            while not self.stop:
                await asyncio.sleep(0)
                yield Chunk(token_ids=[1], text="a")
        finally:
            self.running -= 1

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo("m", 64)]

    async def ready(self) -> bool:
        return True


def test_a_cancelled_caller_always_closes_the_regions_stream():
    # A cancel landing as a chunk arrives must not be lost (the engine request would run on to its end).
    member = Endless()
    b = HealthBook(EJECT_AT_ONCE, ["eu"], local="eu")
    fb = FailoverBackend({"eu": member}, b, RegionsConfig(health=EJECT_AT_ONCE), local="eu")
    request = GenerateRequest("t/1", "m", "hi", SamplingParams(max_tokens=4))

    async def consume() -> None:
        async for _ in fb.generate(request):
            pass

    async def main() -> int:
        for i in range(200):
            task = asyncio.create_task(consume())
            for _ in range(1 + i % 7):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.wait({task}, timeout=2)
            if not task.done():  # the cancel was lost: the stream runs on
                break
        running, member.stop = member.running, True
        return running

    assert asyncio.run(main()) == 0
