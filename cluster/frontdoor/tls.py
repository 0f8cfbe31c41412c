"""Server credentials from ``TLSConfig``: TLS, or mutual TLS when a client CA is set."""

from __future__ import annotations

import grpc

from cluster.config import TLSConfig


def _read(path: str, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"tls.{name}: cannot read {path!r}: {e.strerror}") from None


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials | None:
    """None when TLS is off (plaintext). Reads the PEM files now: call it at server start, not in a config."""
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None  # TLSConfig checks they come together
    cert, key = _read(tls.cert, "cert"), _read(tls.key, "key")
    client_ca = _read(tls.client_ca, "client_ca") if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
