"""``levante.v1.Admin``: fault injection for drills and this router's view of region health.

Served only with ``frontdoor.admin.enabled``, by a gRPC server of its own on ``frontdoor.admin``'s
host and port (loopback by default), never on the public port. Every call needs the admin key or a
client certificate listed in ``frontdoor.admin.client_identities`` (``auth.AdminAuth``): no
credential is UNAUTHENTICATED, a tenant's or peer's key PERMISSION_DENIED. The only module
besides convert.py that touches protobuf (admin messages).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import grpc

from cluster.config import FrontDoorConfig
from cluster.frontdoor.auth import AdminAuth, AuthError, Forbidden, Tenants
from cluster.frontdoor.errors import abort
from cluster.frontdoor.tls import server_credentials
from levante.v1 import admin_pb2 as pb

if TYPE_CHECKING:  # the region router imports the front door's conversions; at run time we only hold one
    from cluster.regions.region_router import RegionRouter

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name  # "levante.v1.Admin"
MAX_DELAY_S = 600.0
ADMIN_LINE = "admin (levante.v1.Admin) on "  # + host:port: the progress line `levante up` reads the port from
log = logging.getLogger(__name__)


class ReplicaControl(Protocol):
    async def kill_replica(self) -> str: ...
    async def kill_rank(self, rank: int) -> str: ...


class DoorControl(Protocol):
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...  # raises RuntimeError while a real drain (SIGTERM) runs


def identities(context: grpc.aio.ServicerContext) -> list[str]:
    """The names a verified client certificate carries (subject CN, SAN), as gRPC reports them."""
    auth = context.auth_context() or {}
    names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


class AdminService:
    def __init__(self, router: RegionRouter, door: DoorControl, replicas: ReplicaControl | None):
        self.router, self.door, self.replicas = router, door, replicas
        self.port = 0  # the admin server's, once started
        self._server: grpc.aio.Server | None = None
        self._auth: AdminAuth | None = None

    async def start(self, config: FrontDoorConfig, tenants: Tenants, environ: Mapping[str, str]) -> int:
        """Serve on ``config.admin``'s host and port (TLS as the front door's); returns the bound port."""
        self._auth = AdminAuth.from_config(config.admin, environ, tenants)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self._handlers(),))
        address = f"{config.admin.host}:{config.admin.port}"
        creds = server_credentials(config.tls)
        try:
            self.port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind": say which key to change
            self.port = 0
        if not self.port:
            raise OSError(f"frontdoor.admin.port: cannot bind {address} (in use?)")
        await server.start()
        self._server = server
        log.info("admin (levante.v1.Admin) on %s, port %d", config.admin.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
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
        )

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        assert self._auth is not None, "start() first"
        try:
            who = self._auth.check(context.invocation_metadata() or (), identities(context))
        except AuthError as e:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(e))
        except Forbidden as e:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e))
        log.debug("admin call by %s", who)

    async def _inject(self, request: pb.FaultRequest, context: grpc.aio.ServicerContext) -> pb.FaultReply:
        await self._authorize(context)
        try:
            detail = await self._apply(request)
        except ValueError as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 -- the fault could not be applied; say why, stay up
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"{type(e).__name__}: {e}")
        log.warning("admin: fault %s applied: %s", pb.FaultKind.Name(request.kind), detail)
        return pb.FaultReply(detail=detail)

    async def _apply(self, request: pb.FaultRequest) -> str:
        kind = request.kind
        if kind == pb.FAULT_KIND_SLOW:
            if not 0 < request.delay_s <= MAX_DELAY_S:
                raise ValueError(f"delay_s: must be in (0, {MAX_DELAY_S:g}], got {request.delay_s}")
            self.router.faults.delay_s = request.delay_s
            return f"every stream waits {request.delay_s:g}s before its first chunk"
        if kind == pb.FAULT_KIND_DRAIN:
            await self.door.pause()
            return "draining: health NOT_SERVING, new calls refused"
        if kind == pb.FAULT_KIND_RESTORE:
            await self.door.resume()  # first: a region really shutting down stays as it is
            self.router.faults.delay_s = 0.0
            return "restored: no delay, serving"
        if kind in (pb.FAULT_KIND_KILL_REPLICA, pb.FAULT_KIND_KILL_RANK):
            return await self._kill(kind, request.rank)
        raise ValueError(f"kind: unknown fault kind {kind}")

    async def _kill(self, kind: int, rank: int) -> str:
        if kind == pb.FAULT_KIND_KILL_RANK and rank < 1:
            # rank 0 runs in the replica's own process and drives the group: killing it is kill_replica
            raise ValueError(f"rank: must be >= 1 (rank 0 is the group's driver; use kill_replica), got {rank}")
        if self.replicas is None:
            raise ValueError("kind: this region's backend has no replicas to kill")
        if kind == pb.FAULT_KIND_KILL_REPLICA:
            return f"replica {await self.replicas.kill_replica()} is exiting"
        return f"rank {rank} of replica {await self.replicas.kill_rank(rank)} killed"

    async def _region_health(
        self, request: pb.RegionHealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegionHealthReply:
        del request
        await self._authorize(context)
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
