"""Stalls of the judging event loop (a GC pause, a starved process) are not a region's silence."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.backends.failover import FailoverBackend
from cluster.config import HealthCheckConfig, RegionsConfig
from cluster.regions.checker import HealthChecker
from cluster.regions.health_book import HEALTHY, UNHEALTHY, HealthBook
from cluster.regions.stalls import Patience, StallWatch
from tests.cluster.regions.test_failover import Scripted, heartbeats, request, start, tokens

IDLE = HealthCheckConfig(consecutive_failures=1, stream_idle_timeout_s=0.3)


def test_the_watch_counts_a_stall_in_the_window_asked_about_before_and_after_it_records_it():
    async def go():
        watch, loop = StallWatch(), asyncio.get_running_loop()
        watch.start()
        await asyncio.sleep(0.25)
        since = loop.time()
        time.sleep(0.8)  # noqa: ASYNC251 -- the stall under test: the loop cannot run
        just_after = watch.lost(since, loop.time())  # the watch has not woken yet
        await asyncio.sleep(0.25)
        recorded, early = watch.lost(since, loop.time()), watch.lost(since - 0.2, since - 0.1)
        await watch.stop()
        return just_after, recorded, early

    just_after, recorded, early = asyncio.run(go())
    assert 0.6 <= just_after <= 0.8 and 0.6 <= recorded <= 0.8, (just_after, recorded)
    assert early == 0.0  # before the stall


class HandedOver(Scripted):
    """A chunk reaches the loop a few iterations after its moment, as grpc's poller thread hands it over."""

    async def generate(self, request):
        async for chunk in super().generate(request):
            for _ in range(3):
                await asyncio.sleep(0)
            yield chunk


def stalled_stream(watching: bool) -> list:
    """A stream in eu whose heartbeats flow every 0.1s, while this loop is blocked for 1.0s (over
    three idle limits) 0.3s in; us would serve it too."""
    eu = HandedOver("eu", [start(), tokens(1), *heartbeats(1.0), tokens(2, region="eu", final=True)])
    us = Scripted("us", [tokens(2, region="us", final=True)])
    book = HealthBook(IDLE, ["eu", "us"])
    fb = FailoverBackend({"eu": eu, "us": us}, book, RegionsConfig(health=IDLE), by_latency=False)

    async def go():
        if watching:
            book.stalls.start()
        asyncio.get_running_loop().call_later(0.3, time.sleep, 1.0)
        chunks = [c async for c in fb.generate(request())]
        await book.stalls.stop()
        return chunks

    return asyncio.run(go())


def test_a_stream_whose_heartbeats_flowed_while_the_loop_stalled_stays_in_its_region():
    chunks = stalled_stream(watching=True)
    assert chunks[-1].served_by.region == "eu" and chunks[-1].failovers is None
    # without the watch the same stall reads as the region's silence
    chunks = stalled_stream(watching=False)
    assert chunks[-1].served_by.region == "us" and "timeout" in chunks[-1].failovers[0].reason


def test_a_check_that_times_out_across_a_stall_of_its_own_loop_proves_nothing():
    cfg = HealthCheckConfig(timeout_s=0.2, unhealthy_threshold=1)

    async def stalls_then_times_out(timeout_s: float) -> tuple[bool, str]:
        time.sleep(0.4)  # noqa: ASYNC251 -- the judge's loop stalls; an answer may wait in its socket
        return False, f"timeout: no health answer within {timeout_s:g}s"

    async def times_out(timeout_s: float) -> tuple[bool, str]:
        await asyncio.sleep(timeout_s)
        return False, f"timeout: no health answer within {timeout_s:g}s"

    async def go(probe) -> str:
        book = HealthBook(cfg, ["eu"])
        checker = HealthChecker(book, {"eu": probe})
        book.stalls.start()
        await asyncio.sleep(0.15)
        await checker.check_once()
        await book.stalls.stop()
        book.on_check("eu", True)  # not counted above: a check now still finds it healthy
        return book.regions["eu"].active

    assert asyncio.run(go(stalls_then_times_out)) == HEALTHY
    assert asyncio.run(go(times_out)) == UNHEALTHY


class Lost(StallWatch):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def lost(self, since: float, now: float) -> float:
        return self.seconds


def test_stalls_stretch_a_patience_at_most_four_times_over_and_never_past_the_cap():
    async def due(watch: StallWatch, cap_in: float | None = None) -> float:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as limit:  # noqa: ASYNC100 -- only Patience's arithmetic is under test
            cap = None if cap_in is None else loop.time() + cap_in
            patience = Patience(watch, limit, 1.0, cap)
            when = patience._handle.when() - patience.since
            patience.cancel()
            return when

    assert asyncio.run(due(Lost(0.5))) == pytest.approx(1.5, abs=0.05)
    assert asyncio.run(due(Lost(100.0))) == pytest.approx(5.0, abs=0.05)  # an always-busy judge still judges
    assert asyncio.run(due(Lost(0.5), cap_in=1.2)) == pytest.approx(1.2, abs=0.05)  # the caller's deadline
