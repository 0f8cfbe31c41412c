"""``Periodic``: one coroutine run every ``interval_s`` in the background of the running event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

log = logging.getLogger(__name__)


class Periodic:
    """Subclasses set ``interval_s`` and ``task_name`` and implement ``tick``; ``start`` / ``stop`` run it."""

    interval_s: float
    task_name = "levante-periodic"
    _task: asyncio.Task | None = None

    async def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.tick()
            except Exception:
                log.exception("%s failed", self.task_name)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - began)))
