"""Active health checks: every ``interval_s``, one probe per region, results into the health book."""

from __future__ import annotations

import asyncio
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
        self.book.stalls.start()  # the failover backend's idle limits read it too
        if self.probes:  # nothing to check: no task
            super().start()

    async def stop(self) -> None:
        await super().stop()
        await self.book.stalls.stop()

    async def tick(self) -> None:
        await self.check_once()

    async def check_once(self) -> None:
        await asyncio.gather(*(self._check(name, probe) for name, probe in self.probes.items()))
        self.book.poll()

    async def _check(self, name: str, probe: Probe) -> None:
        timeout, loop = self.book.cfg.timeout_s, asyncio.get_running_loop()
        began = loop.time()
        try:  # the probe has the timeout too; this bound holds even if it ignores it
            ok, why = await asyncio.wait_for(probe(timeout), timeout * 1.5)
        except TimeoutError:
            ok, why = False, f"timeout: no health answer within {timeout:g}s"
        except Exception as e:  # noqa: BLE001 -- a probe that raises is a failed check
            ok, why = False, f"{type(e).__name__}: {e}"
        took, lost = loop.time() - began, self.book.stalls.lost(began, loop.time())
        if not ok and why.startswith("timeout") and lost > 0 and took - lost < timeout:
            return  # this loop stalled while it waited: the silence may be its own, so the check proves nothing
        self.book.on_check(name, ok, took if ok else None, why)
