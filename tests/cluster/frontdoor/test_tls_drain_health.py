"""TLS and mutual TLS, health, reflection and graceful drain, on a real grpc.aio front door."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.config import FrontDoorConfig, TLSConfig
from cluster.frontdoor import FrontDoor
from levante.v1 import inference_pb2 as pb

from .certs import make_pki
from .harness import ScriptedBackend, channel, generate, rpc_error, serving, stub, wait_until

pytestmark = pytest.mark.e2e
REQ = pb.GenerateRequest(prompt="Hi", max_tokens=2)
SERVICE = "levante.v1.Inference"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _creds(pki, with_client_cert: bool) -> grpc.ChannelCredentials:
    ca = pki["ca"].read_bytes()
    if not with_client_cert:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(ca, pki["client_key"].read_bytes(), pki["client_cert"].read_bytes())


def test_tls(loop, pki):
    tls = TLSConfig(cert=str(pki["server_cert"]), key=str(pki["server_key"]))
    with serving(loop, ScriptedBackend(), FrontDoorConfig(port=0, tls=tls)) as door:
        with channel(door, _creds(pki, with_client_cert=False)) as ch:
            assert generate(ch, REQ, timeout=10)[-1].HasField("final")
        with channel(door) as plain:  # a plaintext client cannot talk to a TLS server
            assert rpc_error(lambda: generate(plain, REQ, timeout=5)).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_rejects_a_client_without_a_certificate(loop, pki):
    tls = TLSConfig(cert=str(pki["server_cert"]), key=str(pki["server_key"]), client_ca=str(pki["ca"]))
    with serving(loop, ScriptedBackend(), FrontDoorConfig(port=0, tls=tls)) as door:
        with channel(door, _creds(pki, with_client_cert=True)) as ch:
            assert generate(ch, REQ, timeout=10)[-1].HasField("final")
        with channel(door, _creds(pki, with_client_cert=False)) as ch:
            assert rpc_error(lambda: generate(ch, REQ, timeout=5)).code() == grpc.StatusCode.UNAVAILABLE


def test_unreadable_certificate_fails_start_naming_the_field(loop, tmp_path):
    tls = TLSConfig(cert=str(tmp_path / "missing.pem"), key=str(tmp_path / "missing.key"))
    door = FrontDoor(FrontDoorConfig(port=0, tls=tls), ScriptedBackend(), "r", "m")
    with pytest.raises(ValueError, match=r"^tls\.cert: cannot read"):
        loop.run(door.start())


def _health(ch, service: str) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_the_backend_and_reflection_lists_the_services(loop):
    backend = ScriptedBackend()
    with serving(loop, backend) as door, channel(door) as ch:
        assert _health(ch, "") == _health(ch, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        backend.is_ready = False
        wait_until(
            lambda: _health(ch, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING,
            timeout=5,
            what="NOT_SERVING once the backend is not ready",
        )
        assert _health(ch, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
        responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]), timeout=5
        )
        files = [f for r in responses for f in r.file_descriptor_response.file_descriptor_proto]
        assert files and any(b"levante/v1/inference.proto" in f for f in files)  # what grpcurl needs


def test_drain_refuses_new_calls_finishes_running_ones_then_stops(loop):
    backend = ScriptedBackend()
    hold = backend.hold = loop.run(_event())
    with serving(loop, backend, FrontDoorConfig(port=0, drain_timeout_s=10)) as door, channel(door) as ch:
        running = stub(ch).Generate(REQ, timeout=10)
        assert next(running).WhichOneof("kind") == "start"
        drained = loop.submit(door.drain())
        wait_until(lambda: _health(ch, "") == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
        assert _health(ch, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        err = rpc_error(lambda: generate(ch, REQ, timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details()
        assert not drained.done()  # still waiting for the running stream
        loop.call(hold.set)
        assert [r.WhichOneof("kind") for r in running][-1] == "final"  # it finished normally
        drained.result(10)
        assert rpc_error(lambda: generate(ch, REQ, timeout=2)).code() == grpc.StatusCode.UNAVAILABLE  # stopped
    assert backend.closed == []


def test_drain_timeout_cancels_streams_that_do_not_finish(loop):
    backend = ScriptedBackend()
    backend.hold = loop.run(_event())  # never set
    with serving(loop, backend, FrontDoorConfig(port=0, drain_timeout_s=0.3)) as door, channel(door) as ch:
        running = stub(ch).Generate(REQ, timeout=10)
        next(running)
        loop.run(door.drain(), timeout=10)
        with pytest.raises(grpc.RpcError):
            list(running)
        wait_until(lambda: len(backend.closed) == 1, what="the held stream to be closed")


async def _event() -> asyncio.Event:
    return asyncio.Event()
