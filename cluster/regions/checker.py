"""Active health checks: every ``interval_s``, one probe per region, results into the health book."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from cluster.periodic import Periodic
from cluster.regions.health_book import HealthBook

Probe = Callable[[float], Awaitable[tuple[bool, str]]]  # (timeout_s) -> (serving, why not)


class HealthChecker(Periodic):
    task_name = "levante-region-health"

    def __init__(self, book: HealthBook, probes: dict[str, Probe]):
        self.book, self.probes = book, probes
        self.interval_s = book.cfg.interval_s

    def start(self) -> None:
        if self.probes:  # nothing to check: no task
            super().start()

    async def tick(self) -> None:
        await self.check_once()

    async def check_once(self) -> None:
        await asyncio.gather(*(self._check(name, probe) for name, probe in self.probes.items()))
        self.book.poll()

    async def _check(self, name: str, probe: Probe) -> None:
        timeout = self.book.cfg.timeout_s
        began = time.monotonic()
        try:  # the probe has the timeout too; this bound holds even if it ignores it
            ok, why = await asyncio.wait_for(probe(timeout), timeout * 1.5)
        except TimeoutError:
            ok, why = False, f"timeout: no health answer within {timeout:g}s"
        except Exception as e:  # noqa: BLE001 -- a probe that raises is a failed check
            ok, why = False, f"{type(e).__name__}: {e}"
        self.book.on_check(name, ok, time.monotonic() - began if ok else None, why)
