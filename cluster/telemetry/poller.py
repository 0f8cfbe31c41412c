"""The engine replicas' figures, asked for every few seconds from the front door's process.

Engine counters live in other processes (each replica's rank 0), so the front door polls them:
``source`` returns the status of every replica it can reach (``ServeBackend.replica_statuses``,
``LocalBackend.replica_statuses``), each ask bounded by the interval. The last answer of each
replica is kept; a replica not heard from for ``STALE_POLLS`` intervals (gone, or replaced by
Serve) is dropped, so its series end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cluster.periodic import Periodic
from cluster.types import ReplicaStatus
from engine.types import EngineStats

log = logging.getLogger(__name__)
STALE_POLLS = 3
StatusSource = Callable[[float], Awaitable[list[ReplicaStatus]]]  # (timeout_s) -> replica statuses


@dataclass(frozen=True)
class ReplicaSnapshot:
    replica: str
    state: str  # the EP group's: starting, serving, restarting, failed, stopped
    restarts: int
    stats: EngineStats | None  # None while its group is not serving
    at: float  # time.monotonic() of the answer


class EnginePoller(Periodic):
    task_name = "levante-engine-poller"

    def __init__(self, source: StatusSource, interval_s: float) -> None:
        self.source, self.interval_s = source, interval_s
        self.snapshots: dict[str, ReplicaSnapshot] = {}  # replaced whole, so a scrape in another thread reads one
        self.polls = 0

    async def tick(self) -> None:
        await self.poll_once()

    async def poll_once(self) -> None:
        try:
            statuses = await asyncio.wait_for(self.source(self.interval_s), self.interval_s)
        except Exception as e:  # noqa: BLE001 -- no answer this time: keep the last figures, they age out
            log.debug("engine poll failed: %r", e)
            statuses = []
        now = time.monotonic()
        fresh = {s.replica: ReplicaSnapshot(s.replica, s.state, s.restarts, s.stats, now) for s in statuses}
        kept = {r: s for r, s in self.snapshots.items() if now - s.at < STALE_POLLS * self.interval_s}
        self.snapshots = {**kept, **fresh}
        self.polls += 1
