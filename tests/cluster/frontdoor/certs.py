"""A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate, made with cryptography."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pem:
    cert: bytes
    key: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    cn: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer or (_name(cn), key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_pki(out: Path) -> dict[str, Path]:
    """Write ca.pem, server.pem/server.key, client.pem/client.key under ``out``; returns their paths."""
    ca_cert, ca_key = _issue("levante test CA", None, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    ca = (ca_cert.subject, ca_key)
    server_cert, server_key = _issue("localhost", ca, leaf + [(san, False), (server_usage, False)])
    client_cert, client_key = _issue(
        "test client", ca, leaf + [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
    )
    files = {
        "ca": ca_cert.public_bytes(serialization.Encoding.PEM),
        "server_cert": server_cert.public_bytes(serialization.Encoding.PEM),
        "server_key": _key_pem(server_key),
        "client_cert": client_cert.public_bytes(serialization.Encoding.PEM),
        "client_key": _key_pem(client_key),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = out / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths
