"""What a region needs from this machine, checked before Ray starts: files, environment variables, ports.

``load_config`` checks a file's keys and values; ``preflight`` checks what those values point at
(a certificate that must be readable, a variable that must be set, a port that must be free), so
a bad one fails in a second, not after Ray has started and the model has loaded. Every problem
names the config file and the full dotted key; the first is reported, with the keys of the others.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping

from cluster.config import ClusterConfig
from cluster.config_loader import ConfigError

Problem = tuple[str, str]  # (dotted key, what is wrong)


def preflight(cfg: ClusterConfig, source: str | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Raise ``ConfigError("source: key: msg")`` for the first problem (naming the keys of any others)."""
    found = problems(cfg, os.environ if environ is None else environ)
    if not found:
        return
    key, msg = found[0]
    more = f" (and {len(found) - 1} more: {', '.join(k for k, _ in found[1:])})" if len(found) > 1 else ""
    prefix = f"{source}: " if source else ""
    raise ConfigError(f"{prefix}{key}: {msg}{more}")


def problems(cfg: ClusterConfig, environ: Mapping[str, str]) -> list[Problem]:
    """Every problem found, in file order: TLS files, tenants' keys, peers, then ports."""
    return [
        *_tls_files(cfg),
        *_tenant_keys(cfg, environ),
        *_admin_key(cfg, environ),
        *_peers(cfg, environ),
        *_ports(cfg),
    ]


def _unreadable(path: str) -> str | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot read {path!r}: {e.strerror or e}"


def _tls_files(cfg: ClusterConfig) -> Iterator[Problem]:
    tls = cfg.frontdoor.tls
    for name in ("cert", "key", "client_ca"):
        path = getattr(tls, name)
        why = _unreadable(path) if path is not None else None
        if why:
            yield f"frontdoor.tls.{name}", why


def _unset(environ: Mapping[str, str], var: str) -> str | None:
    return None if environ.get(var) else f"environment variable {var!r} is not set or empty"


def _tenant_keys(cfg: ClusterConfig, environ: Mapping[str, str]) -> Iterator[Problem]:
    owners: dict[str, str] = {}  # key -> tenant; the front door refuses one key for two tenants
    for i, tenant in enumerate(cfg.frontdoor.tenants):
        where = f"frontdoor.tenants[{i}]"
        if tenant.api_key_env is not None:
            why = _unset(environ, tenant.api_key_env)
            if why:
                yield f"{where}.api_key_env", why
                continue
        key = tenant.api_key if tenant.api_key is not None else environ[tenant.api_key_env or ""]
        if key in owners:
            field = "api_key" if tenant.api_key is not None else "api_key_env"
            yield f"{where}.{field}", f"same key as tenant {owners[key]!r}"
        owners.setdefault(key, tenant.name)


def _admin_key(cfg: ClusterConfig, environ: Mapping[str, str]) -> Iterator[Problem]:
    admin = cfg.frontdoor.admin
    if admin.enabled and admin.api_key_env is not None:
        why = _unset(environ, admin.api_key_env)
        if why:
            yield "frontdoor.admin.api_key_env", why


def _peers(cfg: ClusterConfig, environ: Mapping[str, str]) -> Iterator[Problem]:
    for i, peer in enumerate(cfg.regions.peers):
        where = f"regions.peers[{i}]"
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(peer, name)
            why = _unreadable(path) if path is not None else None
            if why:
                yield f"{where}.{name}", why
        if peer.api_key_env is not None:
            why = _unset(environ, peer.api_key_env)
            if why:
                yield f"{where}.api_key_env", why


def _ports(cfg: ClusterConfig) -> Iterator[Problem]:
    fd, metrics = cfg.frontdoor, cfg.telemetry.metrics
    wanted = [("frontdoor.port", fd.host, fd.port)]
    if metrics.enabled:
        wanted.append(("telemetry.metrics.port", metrics.host, metrics.port))
    if fd.admin.enabled:
        wanted.append(("frontdoor.admin.port", fd.admin.host, fd.admin.port))
    if fd.http.port is not None:
        wanted.append(("frontdoor.http.port", fd.http.host or fd.host, fd.http.port))
    for key, host, port in wanted:
        why = port_in_use(host, port)
        if why:
            yield key, why


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now, or None (port 0: any free port, always fine)."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the servers themselves do (gRPC, prometheus_client): a port left in TIME_WAIT by the
        # last run is free; one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"cannot bind {host}:{port}: {e.strerror or e}"
    return None
