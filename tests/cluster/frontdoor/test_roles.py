"""Roles at the front door: the admin credential on Admin's own port, the peer role for `resume`
and forwarded-call metadata, and a tenant's effort ceiling carried to the region that serves it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest

from cluster.backends.peer import PeerBackend
from cluster.config import AdminConfig, AutoEffortConfig, FrontDoorConfig, PeerConfig, TenantConfig, TLSConfig
from cluster.config_loader import ConfigError, config_from_dict
from cluster.frontdoor import FrontDoor
from cluster.frontdoor.admin import AdminService
from cluster.frontdoor.auth import AuthError, Tenants
from cluster.policy.effort import decide_for
from cluster.telemetry.metrics import ServerMetrics
from cluster.types import AUTO, FORWARDED_FROM, MAX_EFFORT, GenerateRequest
from engine.types import SamplingParams
from levante.v1 import admin_pb2, admin_pb2_grpc
from levante.v1 import inference_pb2 as pb

from .certs import make_pki
from .harness import ScriptedBackend, channel, generate, rpc_error, wait_until

ADMIN_ENV = "LEVANTE_TEST_ADMIN_KEY"
TENANTS = (
    TenantConfig("acme", api_key="tenant-key", max_effort="low"),
    TenantConfig("us-east", api_key="peer-key", role="peer"),
)
REQ = pb.GenerateRequest(prompt="Hi", max_tokens=2)
RESUMED = pb.GenerateRequest(prompt="Hi", max_tokens=4, resume=pb.Resume(token_ids=[7], text_chars=2))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class Replicas:
    def __init__(self) -> None:
        self.killed: list[int] = []

    async def kill_replica(self) -> str:
        return "r0"

    async def kill_rank(self, rank: int) -> str:
        self.killed.append(rank)
        return "r0"


@contextlib.contextmanager
def admin_door(loop, backend, tenants=TENANTS, admin=None, **door) -> Iterator[tuple[FrontDoor, Replicas]]:
    """A front door with Admin enabled (by default: admin key from ADMIN_ENV) and a router stand-in."""
    admin = admin or AdminConfig(enabled=True, api_key_env=ADMIN_ENV)
    door_ = FrontDoor(FrontDoorConfig(port=0, tenants=tenants, admin=admin, **door), backend, "eu", "tiny-moe")
    replicas = Replicas()
    router = SimpleNamespace(faults=SimpleNamespace(delay_s=0.0))
    door_.admin = AdminService(router, door_, replicas)
    loop.run(door_.start())
    try:
        yield door_, replicas
    finally:
        loop.run(door_.stop())


def admin_stub(door: FrontDoor) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(grpc.insecure_channel(f"127.0.0.1:{door.admin_port}"))


def fault(kind: int, **kw) -> admin_pb2.FaultRequest:
    return admin_pb2.FaultRequest(kind=kind, **kw)


@pytest.fixture(autouse=True)
def admin_key(monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, "admin-key")


# ---- admin -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tenants", [TENANTS, ()], ids=["tenants", "anonymous"])
def test_admin_needs_the_admin_key_and_tenant_or_peer_keys_are_denied(loop, tenants):
    with admin_door(loop, ScriptedBackend(), tenants) as (door, _):
        admin = admin_stub(door)
        slow = fault(admin_pb2.FAULT_KIND_SLOW, delay_s=600)
        err = rpc_error(lambda: admin.InjectFault(slow, timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "admin key" in err.details()
        for key in ("tenant-key", "peer-key") if tenants else ():
            err = rpc_error(lambda k=key: admin.InjectFault(slow, timeout=5, metadata=bearer(k)))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "no admin role" in err.details()
        err = rpc_error(lambda: admin.RegionHealth(admin_pb2.RegionHealthRequest(), timeout=5, metadata=bearer("x")))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert door.admin.router.faults.delay_s == 0.0  # nothing was applied
        admin.InjectFault(slow, timeout=5, metadata=bearer("admin-key"))
        assert door.admin.router.faults.delay_s == 600


def test_admin_is_served_on_its_own_loopback_port_never_on_the_public_one(loop):
    with admin_door(loop, ScriptedBackend(), host="0.0.0.0") as (door, _):
        assert door.admin_port and door.admin_port != door.port
        with channel(door) as public:
            err = rpc_error(
                lambda: admin_pb2_grpc.AdminStub(public).InjectFault(
                    fault(admin_pb2.FAULT_KIND_DRAIN), timeout=5, metadata=bearer("admin-key")
                )
            )
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert door.admin.router.faults.delay_s == 0.0 and door._health.serving  # no drain happened
    assert AdminConfig().host == "127.0.0.1"


@pytest.mark.parametrize("listed, code", [("test client", None), ("ops", grpc.StatusCode.PERMISSION_DENIED)])
def test_a_client_certificate_listed_in_client_identities_is_an_admin(loop, tmp_path, listed, code):
    pki = make_pki(tmp_path)
    tls = TLSConfig(cert=str(pki["server_cert"]), key=str(pki["server_key"]), client_ca=str(pki["ca"]))
    admin = AdminConfig(enabled=True, client_identities=(listed,))
    with admin_door(loop, ScriptedBackend(), admin=admin, tls=tls) as (door, _):
        creds = grpc.ssl_channel_credentials(
            pki["ca"].read_bytes(), pki["client_key"].read_bytes(), pki["client_cert"].read_bytes()
        )
        with grpc.secure_channel(f"localhost:{door.admin_port}", creds) as ch:
            ask = lambda: admin_pb2_grpc.AdminStub(ch).InjectFault(fault(admin_pb2.FAULT_KIND_DRAIN), timeout=5)
            if code is None:
                assert "draining" in ask().detail and not door._health.serving
            else:
                err = rpc_error(ask)
                assert err.code() == code and "'test client': not in frontdoor.admin.client_identities" in err.details()


def test_config_refuses_admin_without_a_credential_and_names_the_old_form():
    with pytest.raises(ConfigError, match=r"frontdoor\.admin\.api_key_env: admin is enabled without a credential"):
        config_from_dict({"frontdoor": {"admin": {"enabled": True}}})
    with pytest.raises(ConfigError, match=r"frontdoor\.admin: a bare true/false is the old form"):
        config_from_dict({"frontdoor": {"admin": True}})
    with pytest.raises(ConfigError, match=r"frontdoor\.admin\.client_identities: need mutual TLS"):
        config_from_dict({"frontdoor": {"admin": {"enabled": True, "client_identities": ["ops"]}}})
    ok = config_from_dict({"frontdoor": {"admin": {"enabled": True, "api_key_env": "K"}}}).frontdoor.admin
    assert (ok.host, ok.port) == ("127.0.0.1", 0)


def test_admin_start_refuses_an_unset_key_variable(loop, monkeypatch):
    monkeypatch.delenv(ADMIN_ENV)
    match = rf"frontdoor\.admin\.api_key_env: environment variable '{ADMIN_ENV}'"
    with pytest.raises(ValueError, match=match), admin_door(loop, ScriptedBackend()):
        pass


def test_kill_rank_refuses_rank_0_the_groups_driver(loop):
    with admin_door(loop, ScriptedBackend()) as (door, replicas):
        admin = admin_stub(door)
        err = rpc_error(
            lambda: admin.InjectFault(
                fault(admin_pb2.FAULT_KIND_KILL_RANK, rank=0), timeout=5, metadata=bearer("admin-key")
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("rank: ")
        admin.InjectFault(fault(admin_pb2.FAULT_KIND_KILL_RANK, rank=1), timeout=5, metadata=bearer("admin-key"))
    assert replicas.killed == [1]


def test_restore_undoes_an_admin_drain_but_not_a_real_one(loop):
    backend = ScriptedBackend()
    backend.hold = loop.run(_event())
    key = bearer("admin-key")
    with admin_door(loop, backend, drain_timeout_s=60) as (door, _):
        admin = admin_stub(door)
        admin.InjectFault(fault(admin_pb2.FAULT_KIND_DRAIN), timeout=5, metadata=key)
        assert not door._health.serving
        admin.InjectFault(fault(admin_pb2.FAULT_KIND_RESTORE), timeout=5, metadata=key)
        assert door._health.serving
        # a running stream keeps the real drain (SIGTERM's) waiting
        with channel(door) as ch:
            stream = threading.Thread(target=lambda: generate(ch, REQ, metadata=bearer("tenant-key")), daemon=True)
            stream.start()
            wait_until(lambda: backend.started == 1, what="the stream to start")
            draining = loop.submit(door.drain())
            wait_until(lambda: not door._health.serving, what="the drain")
            err = rpc_error(lambda: admin.InjectFault(fault(admin_pb2.FAULT_KIND_RESTORE), timeout=5, metadata=key))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "SIGTERM" in err.details()
            assert not door._health.serving
            err = rpc_error(lambda: generate(ch, REQ, metadata=bearer("tenant-key")))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details()
            loop.call(backend.hold.set)
            draining.result(10)
            stream.join(10)


async def _event() -> asyncio.Event:
    return asyncio.Event()


# ---- the peer role -----------------------------------------------------------------------------


def test_peer_keys_alone_keep_keyless_calls_anonymous_and_refuse_unknown_keys():
    tenants = Tenants.from_config((TenantConfig("us-east", api_key="peer-key", role="peer"),), {})
    anonymous = tenants.authenticate([])
    assert anonymous.name == "anonymous" and not anonymous.is_peer  # the dev mode: generate, never resume
    assert tenants.authenticate(bearer("peer-key")).is_peer
    with pytest.raises(AuthError, match="unknown API key"):
        tenants.authenticate(bearer("guess"))
    with pytest.raises(ValueError, match=r"^role: must be one of \('tenant', 'peer'\)"):
        TenantConfig("ops", api_key="k", role="admin")


@contextlib.contextmanager
def door_with(loop, backend, tenants=TENANTS, metrics=None) -> Iterator[FrontDoor]:
    door = FrontDoor(FrontDoorConfig(port=0, tenants=tenants), backend, "eu", "tiny-moe", metrics=metrics)
    loop.run(door.start())
    try:
        yield door
    finally:
        loop.run(door.stop())


@pytest.mark.parametrize("tenants, metadata", [(TENANTS, bearer("tenant-key")), ((), ())], ids=["tenant", "anonymous"])
def test_resume_from_a_caller_without_the_peer_role_is_permission_denied(loop, tenants, metadata):
    backend = ScriptedBackend()
    with door_with(loop, backend, tenants) as door, channel(door) as ch:
        err = rpc_error(lambda: generate(ch, RESUMED, metadata=metadata))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and err.details().startswith("resume: ")
        assert backend.started == 0  # the engine never saw the tokens
        if tenants:
            generate(ch, RESUMED, metadata=bearer("peer-key"))
            assert backend.requests[-1].resume.token_ids == (7,)


def test_forged_forwarded_from_and_effort_ceiling_are_ignored_and_counted(loop, caplog):
    backend, metrics = ScriptedBackend(), ServerMetrics("eu", "tiny-moe")
    forged = ((FORWARDED_FROM, "us-east"), (MAX_EFFORT, "high"))
    with door_with(loop, backend, metrics=metrics) as door, channel(door) as ch:
        for _ in range(2):
            generate(ch, REQ, metadata=bearer("tenant-key") + forged)
            request = backend.requests[-1]
            assert request.forwarded_from is None and request.max_effort == "low"  # failover on; ceiling holds
        assert door.ignored_metadata == {FORWARDED_FROM: 2, MAX_EFFORT: 2}
        value = metrics.registry.get_sample_value("levante_untrusted_metadata_ignored_total", {"key": FORWARDED_FROM})
        assert value == 2
        lines = [r.getMessage() for r in caplog.records if "no peer role" in r.getMessage()]
        assert len(lines) == 2 and FORWARDED_FROM in lines[0] and "'acme'" in lines[0]  # once per tenant and key
        generate(ch, REQ, metadata=bearer("peer-key") + ((FORWARDED_FROM, "us-east"),))
        assert backend.requests[-1].forwarded_from == "us-east" and door.ignored_metadata[FORWARDED_FROM] == 2


def test_a_tenants_effort_ceiling_holds_for_auto_in_the_peer_region(loop, monkeypatch):
    """A region router forwards an AUTO request of a tenant capped at `low`: the peer, which knows
    only the peer key, still decides within `low` (before, it took its own ceiling: `high`)."""
    backend = ScriptedBackend()
    monkeypatch.setenv("LEVANTE_TEST_PEER_KEY", "peer-key")
    with door_with(loop, backend) as door:
        peer = PeerConfig("us-east", f"127.0.0.1:{door.port}", api_key_env="LEVANTE_TEST_PEER_KEY")

        async def forward():
            client = PeerBackend(peer, forwarded_from="eu-west")
            request = GenerateRequest(
                "acme/1", "", "Please prove it step by step", SamplingParams(max_tokens=2), AUTO, max_effort="low"
            )
            try:
                return [c async for c in client.generate(request)]
            finally:
                await client.close()

        chunks = loop.run(forward())
    assert chunks[-1].error is None
    served = backend.requests[-1]
    assert served.forwarded_from == "eu-west" and served.max_effort == "low"
    decision = decide_for(served, 0.0, AutoEffortConfig(keyword_effort="high"), now=0.0)
    assert decision.effort == "low" and "capped" in decision.reason
