"""Two regions in one process, each a real grpc.aio front door with its region router over its own
tiny engine, reached only over gRPC: failover, resume mid-stream, drain, ejection by timeout."""

from __future__ import annotations

import asyncio
import os
import socket

import grpc
import pytest

from cluster.backends import LocalBackend
from cluster.backends.peer import PeerBackend
from cluster.config import (
    AdminConfig,
    ClusterConfig,
    FrontDoorConfig,
    HealthCheckConfig,
    PeerConfig,
    RegionsConfig,
    TenantConfig,
)
from cluster.frontdoor import FrontDoor
from cluster.frontdoor.admin import AdminService
from cluster.regions.region_client import RegionClient
from cluster.regions.region_router import build_region_router
from cluster.types import Backend, Chunk, ModelInfo
from levante.v1 import admin_pb2, admin_pb2_grpc
from levante.v1 import inference_pb2 as pb

from ..frontdoor.harness import MODEL, generate
from .fakes import UNBOUND, BreaksAfter, aim_peers, refusing_port

pytestmark = pytest.mark.e2e
HEALTH = HealthCheckConfig(
    interval_s=0.2,
    timeout_s=0.3,
    consecutive_failures=2,
    stream_idle_timeout_s=2.0,
    base_ejection_s=1.0,
)
# the regions' routers present a peer key to each other (only a peer may resume a stream); Admin wants its own
PEER_KEY_ENV, ADMIN_KEY_ENV = "LEVANTE_TEST_PEER_KEY", "LEVANTE_TEST_ADMIN_KEY"
ADMIN_METADATA = (("authorization", "Bearer admin-key"),)
os.environ.setdefault(PEER_KEY_ENV, "peer-key")  # also for the modules that import Regions
os.environ.setdefault(ADMIN_KEY_ENV, "admin-key")
SAMPLED = dict(max_tokens=40, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)


class Regions:
    def __init__(self, loop, engines, break_eu_after: int | None = None, wrap_eu=None):
        self.loop = loop
        self.ports = {}  # each front door's, bound on port 0 and read back; the routers are aimed after
        self.doors, self.routers = {}, {}
        for name, other in (("eu", "us"), ("us", "eu")):
            cfg = ClusterConfig(
                region=name,
                model_name=MODEL,
                frontdoor=FrontDoorConfig(
                    port=0,
                    admin=AdminConfig(enabled=True, api_key_env=ADMIN_KEY_ENV),
                    tenants=(TenantConfig("peers", api_key_env=PEER_KEY_ENV, role="peer"),),
                ),
                regions=RegionsConfig(peers=(PeerConfig(other, UNBOUND, api_key_env=PEER_KEY_ENV),), health=HEALTH),
            )
            info = loop.run(engines[name].info())
            local: Backend = LocalBackend(engines[name], ModelInfo(MODEL, info.max_model_len), name)
            if name == "eu" and break_eu_after is not None:
                local = BreaksAfter(local, break_eu_after)
            if name == "eu" and wrap_eu is not None:
                local = wrap_eu(local)
            router = build_region_router(cfg, local)
            door = FrontDoor(cfg.frontdoor, router.backend, name, MODEL)
            door.admin = AdminService(router, door, None)
            self.doors[name], self.routers[name] = door, router

        async def start():
            for name in ("eu", "us"):
                self.ports[name] = await self.doors[name].start()
            for name in ("eu", "us"):
                aim_peers(self.routers[name], self.ports)
                self.routers[name].start()

        loop.run(start())

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def endpoints(self, *names: str) -> list[str]:
        return [f"{n}={self.target(n)}" for n in names]

    def close(self) -> None:
        async def stop():
            for name in ("eu", "us"):
                await self.doors[name].stop()
                await self.routers[name].stop()

        self.loop.run(stop())


@pytest.fixture
def regions(loop, engines):
    r = Regions(loop, engines)
    yield r
    r.close()


def collect(loop, endpoints, prompt="Tell me a story", on_chunk=None, **kw) -> list[Chunk]:
    async def run():
        out = []
        async with RegionClient(endpoints, health=HEALTH) as client:
            async for chunk in client.generate(prompt, **{**SAMPLED, **kw}):
                out.append(chunk)
                if on_chunk is not None:
                    await on_chunk(out)
        return out

    return loop.run(run(), timeout=60)


def token_ids(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks) -> str:
    return "".join(c.text for c in chunks)


def test_client_resumes_a_stream_whose_region_dies_with_nothing_lost_or_repeated(loop, regions):
    reference = collect(loop, regions.endpoints("us"))
    assert len(token_ids(reference)) == SAMPLED["max_tokens"] and reference[-1].served_by.region == "us"

    async def kill_eu_after_8_tokens(chunks):
        if len(token_ids(chunks)) >= 8 and regions.doors["eu"].port:
            regions.doors["eu"].port = 0
            await regions.doors["eu"].stop()  # the region's front door goes away mid-stream

    chunks = collect(loop, regions.endpoints("eu", "us"), on_chunk=kill_eu_after_8_tokens)
    final = chunks[-1]
    assert final.error is None and final.served_by.region == "us"
    assert token_ids(chunks) == token_ids(reference)  # same seed: the same tokens, none twice, none missing
    assert text(chunks) == text(reference)
    hop = final.failovers[0]
    assert hop.from_region == "eu" and hop.at_token >= 8
    print(f"\nresumed at token {hop.at_token} ({hop.reason}); {len(token_ids(chunks))} tokens, equal to the replay")


def test_region_router_resumes_in_the_peer_when_its_own_replica_breaks(loop, engines):
    regions = Regions(loop, engines, break_eu_after=10)
    try:
        reference = collect(loop, regions.endpoints("us"))
        chunks = collect(loop, regions.endpoints("eu"))  # the client knows eu only: eu's router fails over
        final = chunks[-1]
        assert final.served_by.region == "us" and [(h.from_region, h.at_token) for h in final.failovers] == [("eu", 10)]
        assert token_ids(chunks) == token_ids(reference) and text(chunks) == text(reference)
    finally:
        regions.close()


def test_final_on_the_wire_names_the_failover(loop, engines):
    regions = Regions(loop, engines, break_eu_after=0)
    try:
        req = pb.GenerateRequest(prompt="hello", max_tokens=4, temperature=0.0)
        with grpc.insecure_channel(regions.target("eu")) as ch:
            responses = generate(ch, req)
        final = responses[-1].final
        assert final.served_by.region == "us"
        assert [(f.from_region, f.at_token) for f in final.failovers] == [("eu", 0)]
        assert "replica lost (test)" in final.failovers[0].reason
    finally:
        regions.close()


def _admin(door: FrontDoor):
    return admin_pb2_grpc.AdminStub(grpc.insecure_channel(f"127.0.0.1:{door.admin_port}"))  # not the public port


def test_drain_sends_traffic_to_the_peer_and_restore_brings_it_back(loop, regions):
    admin = _admin(regions.doors["eu"])
    assert (
        "draining"
        in admin.InjectFault(
            admin_pb2.FaultRequest(kind=admin_pb2.FAULT_KIND_DRAIN), timeout=5, metadata=ADMIN_METADATA
        ).detail
    )
    drained = collect(loop, regions.endpoints("eu", "us"), max_tokens=4)
    assert drained[-1].served_by.region == "us" and drained[-1].failovers[0].from_region == "eu"
    admin.InjectFault(admin_pb2.FaultRequest(kind=admin_pb2.FAULT_KIND_RESTORE), timeout=5, metadata=ADMIN_METADATA)
    back = collect(loop, regions.endpoints("eu", "us"), max_tokens=4)
    assert back[-1].served_by.region == "eu" and not back[-1].failovers


def test_admin_reports_each_routers_view_and_rejects_bad_faults(loop, regions):
    admin = _admin(regions.doors["eu"])
    loop.run(asyncio.sleep(0.5))  # a few active checks
    reply = admin.RegionHealth(admin_pb2.RegionHealthRequest(), timeout=5, metadata=ADMIN_METADATA)
    view = {r.name: r for r in reply.regions}
    assert set(view) == {"eu", "us"} and view["eu"].local and view["us"].available and view["us"].latency_ms > 0
    with pytest.raises(grpc.RpcError) as e:
        admin.InjectFault(
            admin_pb2.FaultRequest(kind=admin_pb2.FAULT_KIND_SLOW, delay_s=-1), timeout=5, metadata=ADMIN_METADATA
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "delay_s" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        admin.InjectFault(
            admin_pb2.FaultRequest(kind=admin_pb2.FAULT_KIND_KILL_REPLICA), timeout=5, metadata=ADMIN_METADATA
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no Serve replicas in this process


def test_a_frozen_peer_fails_checks_by_timeout_and_a_dead_one_by_refusal(loop):
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(8)  # accepts connections (the kernel does), never answers: a SIGSTOPped process
    dead = refusing_port()  # nobody listens, and nobody else can take the port meanwhile

    async def check():
        out = {}
        for name, port in (("frozen", frozen.getsockname()[1]), ("dead", dead.getsockname()[1])):
            peer = PeerBackend(PeerConfig(name, f"127.0.0.1:{port}"))
            out[name] = await peer.check(0.5)
            await peer.close()
        return out

    try:
        result = loop.run(check())
    finally:
        frozen.close()
        dead.close()
    assert result["frozen"] == (False, "timeout: no health answer within 0.5s")
    assert result["dead"][0] is False and result["dead"][1].startswith("unavailable:")
