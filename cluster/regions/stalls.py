"""How long the event loop that judges regions could not run: a GC pause, a process starved of CPU.

A region's heartbeats that arrive while the judge's own loop is stalled wait in its sockets, and the
idle timer that fires as the loop wakes would blame the region for the judge's silence. So silence
is counted in time the loop could listen (``StallWatch.lost``), and a check that times out across a
stall proves nothing about its region.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

TICK_S = 0.1  # a tick later than this again is a stall
MAX_STRETCH = 4.0  # stalls stretch a patience at most this many times over: a judge always busy still judges
LOG_STALL_S = 1.0  # a stall this long is logged: the process is starved, or blocks its loop
log = logging.getLogger(__name__)


class StallWatch:
    """Wakes every ``tick_s`` in the running loop and records each wake-up late by more than a tick."""

    def __init__(self, tick_s: float = TICK_S, keep: int = 128):
        self.tick_s = tick_s
        self._stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=keep)  # loop times
        self._due: float | None = None  # when the running watch's next tick is due
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="levante-stall-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task, self._due = None, None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._due = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            if now - self._due > self.tick_s:
                self._stalls.append((self._due, now))
                if now - self._due >= LOG_STALL_S:
                    log.warning(
                        "event loop stalled for %.2fs: silence in it is not counted against regions", now - self._due
                    )

    def lost(self, since: float, now: float) -> float:
        """Seconds of ``[since, now]`` (loop time) in which the loop was stalled."""
        spans = list(self._stalls)
        if self._due is not None and now - self._due > self.tick_s:
            spans.append((self._due, now))  # a stall that has just ended: the watch has not run since
        return sum(max(0.0, min(end, now) - max(start, since)) for start, end in spans)


class Patience:
    """Expires ``limit`` (the waiting task's ``asyncio.Timeout``) after ``patience_s`` of silence in
    which the loop could listen, and at ``cap`` (loop time) at the latest, stalls or not."""

    def __init__(self, watch: StallWatch, limit: asyncio.Timeout, patience_s: float, cap: float | None = None):
        self.loop = asyncio.get_running_loop()
        self.watch, self.limit, self.patience_s, self.cap = watch, limit, patience_s, cap
        self.since = self.loop.time()
        self._handle: asyncio.TimerHandle | None = None
        self._check()

    def shorten(self, patience_s: float) -> None:
        if patience_s < self.patience_s:
            self.patience_s = patience_s
            self._check()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _check(self) -> None:
        self.cancel()
        if self.limit.expired():
            return
        now = self.loop.time()
        stretch = min(self.watch.lost(self.since, now), MAX_STRETCH * self.patience_s)
        due = self.since + self.patience_s + stretch
        if self.cap is not None:
            due = min(due, self.cap)
        if due > now:
            self._handle = self.loop.call_at(due, self._check)
        else:
            self.limit.reschedule(now)  # expires at once
