"""``levante.v1.Admin``: fault injection for drills and this router's view of region health.

Served only with ``frontdoor.admin: true``, on the front door's port; tenants' API keys apply
as for Generate. The only module besides convert.py that touches protobuf (admin messages).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import grpc

from levante.v1 import admin_pb2 as pb

if TYPE_CHECKING:  # the region router imports the front door's conversions; at run time we only hold one
    from cluster.regions.region_router import RegionRouter

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name  # "levante.v1.Admin"


class ReplicaControl(Protocol):
    async def kill_replica(self) -> str: ...
    async def kill_rank(self, rank: int) -> str: ...


class DoorControl(Protocol):
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...


class AdminService:
    def __init__(
        self,
        router: RegionRouter,
        door: DoorControl,
        replicas: ReplicaControl | None,
        authenticate: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
    ):
        self.router, self.door, self.replicas, self.authenticate = router, door, replicas, authenticate

    def add_to(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE_NAME,
                    {
                        "InjectFault": grpc.unary_unary_rpc_method_handler(
                            self._inject, pb.FaultRequest.FromString, pb.FaultReply.SerializeToString
                        ),
                        "RegionHealth": grpc.unary_unary_rpc_method_handler(
                            self._region_health,
                            pb.RegionHealthRequest.FromString,
                            pb.RegionHealthReply.SerializeToString,
                        ),
                    },
                ),
            )
        )

    async def _inject(self, request: pb.FaultRequest, context: grpc.aio.ServicerContext) -> pb.FaultReply:
        await self.authenticate(context)
        try:
            detail = await self._apply(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 -- the fault could not be applied; say why, stay up
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{type(e).__name__}: {e}")
        return pb.FaultReply(detail=detail)

    async def _apply(self, request: pb.FaultRequest) -> str:
        kind = request.kind
        if kind == pb.FAULT_KIND_SLOW:
            if not 0 < request.delay_s <= 600:
                raise ValueError(f"delay_s: must be in (0, 600], got {request.delay_s}")
            self.router.faults.delay_s = request.delay_s
            return f"every stream waits {request.delay_s:g}s before its first chunk"
        if kind == pb.FAULT_KIND_DRAIN:
            await self.door.pause()
            return "draining: health NOT_SERVING, new calls refused"
        if kind == pb.FAULT_KIND_RESTORE:
            self.router.faults.delay_s = 0.0
            await self.door.resume()
            return "restored: no delay, serving"
        if kind in (pb.FAULT_KIND_KILL_REPLICA, pb.FAULT_KIND_KILL_RANK):
            if self.replicas is None:
                raise ValueError("kind: this region's backend has no replicas to kill")
            if kind == pb.FAULT_KIND_KILL_REPLICA:
                return f"replica {await self.replicas.kill_replica()} is exiting"
            return f"rank {request.rank} of replica {await self.replicas.kill_rank(request.rank)} killed"
        raise ValueError(f"kind: unknown fault kind {kind}")

    async def _region_health(
        self, request: pb.RegionHealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegionHealthReply:
        del request
        await self.authenticate(context)
        book = self.router.book
        now = book.clock()
        reply = pb.RegionHealthReply()
        for h in book.regions.values():
            reply.regions.add(
                name=h.name,
                local=h.local,
                available=h.available(now),
                state=h.state(now),
                reason=h.reason,
                latency_ms=(h.latency_s or 0.0) * 1000,
                ejections=h.ejections,
            )
        for t in book.transitions:
            reply.transitions.add(unix_time=t.t, region=t.region, state=t.state, reason=t.reason)
        return reply
