"""Injecting a scenario's faults: signals to a region's processes, or its Admin service (on the
region's own admin port, with the run's admin key)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from cluster.ops.drill.scenario import FaultSpec
from cluster.ops.up.processes import LocalRegions
from levante.v1 import admin_pb2, admin_pb2_grpc

ADMIN_TIMEOUT_S = 30.0
_ADMIN_KIND = {
    "kill_replica": admin_pb2.FAULT_KIND_KILL_REPLICA,
    "kill_rank": admin_pb2.FAULT_KIND_KILL_RANK,
    "slow_region": admin_pb2.FAULT_KIND_SLOW,
    "drain_region": admin_pb2.FAULT_KIND_DRAIN,
}


class Injector:
    def __init__(self, regions: LocalRegions, progress: Callable[[str], None], start_timeout_s: float = 600.0):
        self.regions, self.progress, self.start_timeout_s = regions, progress, start_timeout_s

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.regions.admin_key}"),)

    async def _admin(self, region: str, request: admin_pb2.FaultRequest) -> str:
        async with grpc.aio.insecure_channel(self.regions.regions[region].admin_target) as ch:
            reply = await admin_pb2_grpc.AdminStub(ch).InjectFault(
                request, timeout=ADMIN_TIMEOUT_S, metadata=self._metadata()
            )
        return reply.detail

    async def inject(self, f: FaultSpec) -> str:
        if f.kind == "kill_region":
            return f"SIGKILL to {self.regions.kill(f.region)} process(es)"
        if f.kind == "freeze_region":
            return f"SIGSTOP to {self.regions.freeze(f.region)} process(es)"
        return await self._admin(
            f.region, admin_pb2.FaultRequest(kind=_ADMIN_KIND[f.kind], delay_s=f.delay_s, rank=f.rank)
        )

    async def restore(self, f: FaultSpec) -> str:
        if f.kind == "kill_region":
            await asyncio.to_thread(self.regions.restart, f.region, self.progress, self.start_timeout_s)
            return "restarted and serving"
        if f.kind == "freeze_region":
            return f"SIGCONT to {self.regions.thaw(f.region)} process(es)"
        if f.kind in ("slow_region", "drain_region"):
            return await self._admin(f.region, admin_pb2.FaultRequest(kind=admin_pb2.FAULT_KIND_RESTORE))
        return "heals itself (gang restart / Serve replaces the replica)"

    async def region_transitions(self, region: str) -> list[admin_pb2.HealthTransition]:
        """The region router's own record of health transitions (empty if it cannot answer)."""
        try:
            async with grpc.aio.insecure_channel(self.regions.regions[region].admin_target) as ch:
                reply = await admin_pb2_grpc.AdminStub(ch).RegionHealth(
                    admin_pb2.RegionHealthRequest(), timeout=5, metadata=self._metadata()
                )
        except grpc.aio.AioRpcError:
            return []
        return list(reply.transitions)
