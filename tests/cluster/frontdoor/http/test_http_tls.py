"""The HTTP API with the front door's TLS settings: HTTPS with its certificate, and mutual TLS with a client
CA (the ``openai`` client over an httpx client that trusts the test CA)."""

from __future__ import annotations

import ssl

import httpx
import openai
import pytest

from cluster.config import FrontDoorConfig, TLSConfig

from ..certs import make_pki
from ..harness import MODEL, ScriptedBackend, serving
from .harness import client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _context(pki, with_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if with_client_cert:
        context.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return context


def _chat(door, pki, with_client_cert: bool) -> str:
    http = httpx.Client(verify=_context(pki, with_client_cert))
    c = client(door, http_client=http)
    return (
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content
    )


def test_https_with_the_doors_certificate(loop, pki):
    tls = TLSConfig(cert=str(pki["server_cert"]), key=str(pki["server_key"]))
    with serving(loop, ScriptedBackend(), FrontDoorConfig(port=0, tls=tls)) as door:
        assert door.http.url.startswith("https://")
        assert _chat(door, pki, with_client_cert=False) == "hi!"
        with pytest.raises(httpx.HTTPError):  # a plaintext client cannot talk to it
            httpx.get(f"http://127.0.0.1:{door.http.port}/health", timeout=5)


def test_mutual_tls_needs_a_client_certificate(loop, pki):
    tls = TLSConfig(cert=str(pki["server_cert"]), key=str(pki["server_key"]), client_ca=str(pki["ca"]))
    with serving(loop, ScriptedBackend(), FrontDoorConfig(port=0, tls=tls)) as door:
        assert _chat(door, pki, with_client_cert=True) == "hi!"
        with pytest.raises(openai.APIConnectionError):  # the handshake fails without one
            _chat(door, pki, with_client_cert=False)
