"""Refusals over real front doors: they reach the caller as themselves, once, from the client library,
the region router and ``levante client`` alike, and no other region is asked."""

from __future__ import annotations

import grpc
import pytest

from cluster import cli
from cluster.config import ClusterConfig, FrontDoorConfig, PeerConfig, RegionsConfig, TenantConfig
from cluster.frontdoor import FrontDoor
from cluster.regions.region_client import RegionClient
from cluster.regions.region_router import build_region_router
from cluster.types import INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED, UNAVAILABLE, Chunk, ChunkError
from levante.v1 import inference_pb2 as pb

from ..frontdoor.harness import MODEL, ScriptedBackend, generate, serving

pytestmark = pytest.mark.e2e
KEY = "acme-key"
TENANTS = FrontDoorConfig(port=0, tenants=(TenantConfig("acme", api_key=KEY),))


def ask(loop, endpoints: list[str], prompt: str = "Hi", **kw) -> list[Chunk]:
    async def run() -> list[Chunk]:
        async with RegionClient(endpoints, **kw) as client:
            return [c async for c in client.generate(prompt, max_tokens=2)]

    return loop.run(run())


def levante(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keyed(loop):
    with serving(loop, ScriptedBackend(), TENANTS) as door:
        yield door


def test_no_key_is_unauthenticated_from_the_client_library_not_an_outage(loop, keyed):
    backend_b = ScriptedBackend()
    with serving(loop, backend_b) as open_door:
        err = ask(loop, [f"eu=localhost:{keyed.port}", f"us=localhost:{open_door.port}"])[-1].error
    assert (err.code, err.origin) == (UNAUTHENTICATED, "eu")
    assert err.message.startswith("authorization: missing")
    assert backend_b.started == 0  # the same key would be missing there too
    assert ask(loop, [f"eu=localhost:{keyed.port}"], api_key=KEY)[-1].error is None


def test_no_key_is_unauthenticated_from_the_cli(loop, keyed, capsys, monkeypatch):
    monkeypatch.delenv("LEVANTE_API_KEY", raising=False)
    target = f"localhost:{keyed.port}"
    code, _, err = levante(capsys, "client", "generate", "--target", target, "Hi")
    assert code == 2
    assert err.startswith(f"levante: error: UNAUTHENTICATED from {target}: authorization: missing")
    assert "no region could serve" not in err
    monkeypatch.setenv("LEVANTE_API_KEY", KEY)
    code, out, _ = levante(capsys, "client", "generate", "--target", target, "Hi")
    assert code == 0 and "hi!" in out


@pytest.mark.parametrize(
    "code, status",
    [(PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED), (INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT)],
)
def test_a_peer_that_refuses_is_not_retried_in_the_next_region(loop, code, status):
    refusing, spare = ScriptedBackend(), ScriptedBackend()
    refusing.error = ChunkError(code, "tenant", "'acme' may not use this model")
    with serving(loop, refusing) as first, serving(loop, spare) as second:
        err = ask(loop, [f"eu=localhost:{first.port}", f"us=localhost:{second.port}"])[-1].error
    assert (err.code, err.origin, err.message) == (code, "eu", "tenant: 'acme' may not use this model")
    assert spare.started == 0


def test_the_region_router_relays_a_peers_refusal_with_its_own_details(loop):
    """eu's own replicas are down, so its router asks us, which refuses: the caller hears us' refusal."""
    down, refusing = ScriptedBackend(), ScriptedBackend()
    down.error = ChunkError(UNAVAILABLE, "replica", "no replica is ready")
    refusing.error = ChunkError(PERMISSION_DENIED, "tenant", "'eu-west' may not use this model")
    with serving(loop, refusing) as us:
        cfg = ClusterConfig(
            region="eu",
            model_name=MODEL,
            frontdoor=FrontDoorConfig(port=0),
            regions=RegionsConfig(peers=(PeerConfig("us", f"localhost:{us.port}"),)),
        )
        router = build_region_router(cfg, down)  # not started: no probes, so the order is eu, then us
        door = FrontDoor(cfg.frontdoor, router.backend, "eu", MODEL)
        loop.run(door.start())
        try:
            with grpc.insecure_channel(f"localhost:{door.port}") as ch, pytest.raises(grpc.RpcError) as e:
                generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=2), timeout=10)
        finally:
            loop.run(door.stop())
            loop.run(router.stop())
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.details() == "tenant: 'eu-west' may not use this model"
    assert len(down.requests) == len(refusing.requests) == 1


def test_cli_errors_say_the_code_once_and_never_nothing(loop, capsys):
    with serving(loop, ScriptedBackend()) as door:
        target = f"localhost:{door.port}"
        code, _, err = levante(capsys, "client", "generate", "--target", target, "--model", "bogus", "Hi")
        assert code == 2 and err.count("INVALID_ARGUMENT") == 1
        assert err.startswith(f"levante: error: INVALID_ARGUMENT from {target}: model: unknown model 'bogus'")
        code, _, err = levante(capsys, "client", "health", "--target", target, "--service", "bogus")
        assert (code, err) == (2, "levante: error: NOT_FOUND: unknown service 'bogus'\n")


def test_an_empty_chat_prompt_is_refused_like_an_empty_raw_one(loop, capsys):
    backend = ScriptedBackend()
    with serving(loop, backend) as door:
        target = f"localhost:{door.port}"
        code, _, chat = levante(capsys, "client", "generate", "--target", target, "")
        raw_code, _, raw = levante(capsys, "client", "generate", "--target", target, "--raw", "")
    assert (code, raw_code) == (2, 2) and backend.started == 0
    assert chat == f"levante: error: INVALID_ARGUMENT from {target}: chat.messages[0].content: must not be empty\n"
    assert raw == f"levante: error: INVALID_ARGUMENT from {target}: prompt: must not be empty\n"
