"""A region calling a peer that wants mutual TLS and an API key: regions.peers[].tls_* and api_key_env."""

from __future__ import annotations

import pytest

from cluster.backends.peer import PeerBackend
from cluster.config import FrontDoorConfig, PeerConfig, TenantConfig, TLSConfig
from cluster.types import UNAUTHENTICATED, UNAVAILABLE, GenerateRequest
from engine.types import SamplingParams

from ..frontdoor.certs import make_pki
from ..frontdoor.harness import ScriptedBackend, serving

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def peer_door(loop, pki):
    tls = TLSConfig(cert=str(pki["server_cert"]), key=str(pki["server_key"]), client_ca=str(pki["ca"]))
    config = FrontDoorConfig(port=0, tls=tls, tenants=(TenantConfig("eu-west", api_key="region-key", role="peer"),))
    backend = ScriptedBackend()
    with serving(loop, backend, config) as door:
        yield door, backend


def _call(loop, peer: PeerConfig, **kw):
    async def run():
        backend = PeerBackend(peer, forwarded_from="eu-west", **kw)
        try:
            ok = await backend.check(5.0)
            chunks = [c async for c in backend.generate(GenerateRequest("t/1", "", "Hi", SamplingParams(max_tokens=2)))]
            return ok, chunks
        finally:
            await backend.close()

    return loop.run(run())


def test_mutual_tls_and_a_key_from_the_environment(loop, pki, peer_door, monkeypatch):
    door, backend = peer_door
    monkeypatch.setenv("US_EAST_KEY", "region-key")
    peer = PeerConfig(
        "us-east",
        f"localhost:{door.port}",
        tls_ca=str(pki["ca"]),
        tls_cert=str(pki["client_cert"]),
        tls_key=str(pki["client_key"]),
        api_key_env="US_EAST_KEY",
    )
    (serving_, why), chunks = _call(loop, peer)
    assert serving_ and why == ""
    assert chunks[-1].finished and chunks[-1].error is None and [t for c in chunks for t in c.token_ids] == [7, 8]
    assert backend.requests[-1].forwarded_from == "eu-west"  # the peer knows not to forward it again
    assert backend.requests[-1].tenant == "eu-west"


def test_without_a_client_certificate_the_peer_cannot_serve_and_a_wrong_key_is_refused_as_such(loop, pki, peer_door):
    door, _ = peer_door
    no_cert = PeerConfig("us-east", f"localhost:{door.port}", tls_ca=str(pki["ca"]))
    (serving_, _why), chunks = _call(loop, no_cert, api_key="region-key")
    assert not serving_ and chunks[-1].error.code == UNAVAILABLE  # the handshake fails: try another region
    wrong_key = PeerConfig(
        "us-east",
        f"localhost:{door.port}",
        tls_ca=str(pki["ca"]),
        tls_cert=str(pki["client_cert"]),
        tls_key=str(pki["client_key"]),
    )
    _, chunks = _call(loop, wrong_key, api_key="not-the-key")
    err = chunks[-1].error  # the key is wrong in every region: the caller hears it, no other region is tried
    assert (err.code, err.origin) == (UNAUTHENTICATED, "us-east") and err.message.startswith("authorization:")


def test_an_unreadable_certificate_or_unset_key_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^regions\.peers\[us-east\]\.tls_ca: cannot read .*missing\.pem"):
        PeerBackend(PeerConfig("us-east", "localhost:1", tls_ca=str(tmp_path / "missing.pem")))
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(
        ValueError,
        match=r"^regions\.peers\[us-east\]\.api_key_env: environment variable "
        r"NO_SUCH_KEY is not set",
    ):
        PeerBackend(PeerConfig("us-east", "localhost:1", api_key_env="NO_SUCH_KEY"))
