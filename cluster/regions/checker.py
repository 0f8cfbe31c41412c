"""Active health checks: every ``interval_s``, one probe per region, results into the health book."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

from cluster.regions.health import HealthBook

log = logging.getLogger(__name__)
Probe = Callable[[float], Awaitable[tuple[bool, str]]]  # (timeout_s) -> (serving, why not)


class HealthChecker:
    def __init__(self, book: HealthBook, probes: dict[str, Probe]):
        self.book, self.probes = book, probes
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None and self.probes:
            self._task = asyncio.create_task(self._run(), name="levante-region-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check_once(self) -> None:
        await asyncio.gather(*(self._check(name, probe) for name, probe in self.probes.items()))
        self.book.poll()

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 -- a broken probe must not end health checking
                log.exception("region health check failed")
            await asyncio.sleep(max(0.0, self.book.cfg.interval_s - (time.monotonic() - began)))

    async def _check(self, name: str, probe: Probe) -> None:
        timeout = self.book.cfg.timeout_s
        began = time.monotonic()
        try:  # the probe has the timeout too; this bound holds even if it ignores it
            ok, why = await asyncio.wait_for(probe(timeout), timeout * 1.5)
        except asyncio.TimeoutError:
            ok, why = False, f"timeout: no health answer within {timeout:g}s"
        except Exception as e:  # noqa: BLE001 -- a probe that raises is a failed check
            ok, why = False, f"{type(e).__name__}: {e}"
        self.book.on_check(name, ok, time.monotonic() - began if ok else None, why)
