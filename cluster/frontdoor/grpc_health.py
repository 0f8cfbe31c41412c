"""``grpc.health.v1`` for the front door: one status for "" and the service, following the backend."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE_NAME = health.SERVICE_NAME
POLL_S = 1.0  # how often the status follows the backend


class HealthReporter:
    """Reports SERVING while ``is_serving()`` holds; Watch streams hear about changes only."""

    def __init__(self, service_name: str, is_serving: Callable[[], Awaitable[bool]]):
        self._names = ("", service_name)  # grpc_health_probe asks "" unless given -service
        self._is_serving = is_serving
        self._servicer = health.aio.HealthServicer()
        self._status: int | None = None
        self._task: asyncio.Task | None = None

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def set(self, status: int) -> None:
        if status == self._status:
            return
        self._status = status
        for name in self._names:
            await self._servicer.set(name, status)

    @property
    def serving(self) -> bool:
        """The last status (refreshed every POLL_S): calls read this instead of asking the backend each time."""
        return self._status == SERVING

    async def refresh(self) -> None:
        await self.set(SERVING if await self._is_serving() else NOT_SERVING)

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="frontdoor-health")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self.refresh()
