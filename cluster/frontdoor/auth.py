"""API keys -> tenants, and each tenant's limits: a token bucket for the request rate, a concurrency cap.

Roles: a key belongs to a tenant (an end client) or a peer (another region's router, which alone
may resume a stream or name the region that forwarded a call). The admin key, or a listed client
certificate, is the only admin credential (``AdminAuth``); no tenant or peer key is one.

Keys are compared by their SHA-256 digest, so no key is kept or compared in
the clear. ``Tenants`` lives on the front door's event loop: no locks.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster.config import AdminConfig, TenantConfig

ANONYMOUS = "anonymous"
PEER = "peer"


class AuthError(Exception):
    """The caller is not who it must be (UNAUTHENTICATED)."""


class Forbidden(Exception):
    """The caller is known but its role does not allow the call (PERMISSION_DENIED)."""


class LimitExceeded(Exception):
    """The tenant is over its rate or concurrency (RESOURCE_EXHAUSTED)."""


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` saved; each request takes one."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._last = burst, clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@dataclass
class Tenant:
    name: str
    max_effort: str = "high"
    max_concurrency: int = 0  # 0: unlimited
    bucket: TokenBucket | None = None  # None: no rate limit
    first_token_timeout_s: float | None = None  # the tenant's limit on a first token; None: none
    cache_group: str | None = None  # prefix-cache namespace (frontdoor.tenants[].prefix_cache_group); None: the name
    role: str = "tenant"  # or PEER
    inflight: int = field(default=0, compare=False)

    @property
    def is_peer(self) -> bool:
        return self.role == PEER


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _tenant(cfg: TenantConfig, clock: Callable[[], float]) -> Tenant:
    bucket = None
    if cfg.requests_per_second > 0:
        bucket = TokenBucket(cfg.requests_per_second, cfg.burst or max(1.0, cfg.requests_per_second), clock)
    first_token = cfg.first_token_timeout_s or None
    return Tenant(
        cfg.name,
        cfg.max_effort,
        cfg.max_concurrency,
        bucket,
        first_token_timeout_s=first_token,
        cache_group=cfg.cache_group,
        role=cfg.role,
    )


def _bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The key of ``authorization: Bearer <key>``; None when no such header was sent."""
    header = next((v for k, v in metadata if k.lower() == "authorization"), None)
    if header is None:
        return None
    scheme, _, key = header.strip().partition(" ") if isinstance(header, str) else ("", "", "")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("authorization: expected 'Bearer <api key>'")
    return key.strip()


class Tenants:
    """Who may call. With no tenant of role ``tenant`` configured, a call without a key is the unlimited
    tenant ``anonymous`` (a dev setup); a call with a key must present a configured one (a peer's)."""

    def __init__(self, by_digest: Mapping[bytes, Tenant]):
        self._by_digest = dict(by_digest)
        self._anonymous = Tenant(ANONYMOUS)

    @classmethod
    def from_config(
        cls, tenants: Sequence[TenantConfig], environ: Mapping[str, str], clock: Callable[[], float] = time.monotonic
    ) -> Tenants:
        """Resolve keys (``api_key`` or the variable ``api_key_env`` names); raises ValueError naming the tenant."""
        by_digest: dict[bytes, Tenant] = {}
        for i, cfg in enumerate(tenants):
            key = cfg.api_key if cfg.api_key is not None else environ.get(cfg.api_key_env or "")
            where = f"tenants[{i}] ({cfg.name!r})"
            if not key:
                raise ValueError(f"{where}.api_key_env: environment variable {cfg.api_key_env!r} is not set or empty")
            digest = _digest(key)
            if digest in by_digest:
                raise ValueError(f"{where}.api_key: same key as tenant {by_digest[digest].name!r}")
            by_digest[digest] = _tenant(cfg, clock)
        return cls(by_digest)

    @property
    def enabled(self) -> bool:
        """Whether every call needs a key (some tenant is configured; peers alone do not require one)."""
        return any(not t.is_peer for t in self._by_digest.values())

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Tenant:
        if not self._by_digest:
            return self._anonymous  # no keys at all: whatever a caller sends, it is anonymous
        key = _bearer(metadata)
        if key is None:
            if self.enabled:
                raise AuthError("authorization: missing; send metadata 'authorization: Bearer <api key>'")
            return self._anonymous
        tenant = self.lookup(key)
        if tenant is None:
            raise AuthError("authorization: unknown API key")
        return tenant

    def lookup(self, key: str) -> Tenant | None:
        return self._by_digest.get(_digest(key))

    def admit(self, tenant: Tenant) -> None:
        """Count one call against the tenant's limits; pair with ``release`` when it ends."""
        if tenant.max_concurrency and tenant.inflight >= tenant.max_concurrency:
            raise LimitExceeded(
                f"tenant {tenant.name!r}: {tenant.inflight} calls in flight, "
                f"max_concurrency is {tenant.max_concurrency}"
            )
        if tenant.bucket is not None and not tenant.bucket.take():
            raise LimitExceeded(
                f"tenant {tenant.name!r}: over {tenant.bucket.rate:g} requests/s "
                f"(burst {tenant.bucket.burst:g}); retry later"
            )
        tenant.inflight += 1

    def release(self, tenant: Tenant) -> None:
        tenant.inflight -= 1


class AdminAuth:
    """Who may call ``levante.v1.Admin``: the admin key, or a client certificate named in
    ``frontdoor.admin.client_identities``. Tenant and peer keys are known callers without the role."""

    def __init__(self, key_digest: bytes | None, identities: frozenset[str], tenants: Tenants):
        self._digest, self._identities, self._tenants = key_digest, identities, tenants

    @classmethod
    def from_config(cls, cfg: AdminConfig, environ: Mapping[str, str], tenants: Tenants) -> AdminAuth:
        """Read the admin key now; raises ValueError naming the key when its variable is unset or reused."""
        digest = None
        if cfg.api_key_env is not None:
            key = environ.get(cfg.api_key_env)
            if not key:
                raise ValueError(
                    f"frontdoor.admin.api_key_env: environment variable {cfg.api_key_env!r} is not set or empty"
                )
            if tenants.lookup(key) is not None:
                raise ValueError("frontdoor.admin.api_key_env: the admin key is also a tenant's or peer's key")
            digest = _digest(key)
        return cls(digest, frozenset(cfg.client_identities), tenants)

    def check(self, metadata: Sequence[tuple[str, str | bytes]], identities: Sequence[str]) -> str:
        """Who the admin is; raises AuthError (no or unknown credential) or Forbidden (a credential
        without the admin role)."""
        listed = self._identities.intersection(identities)
        if listed:
            return f"client certificate {min(listed)!r}"
        key = _bearer(metadata)
        if key is None:
            if identities:
                raise Forbidden(f"client certificate {identities[0]!r}: not in frontdoor.admin.client_identities")
            raise AuthError(
                "authorization: admin calls need the admin key ('authorization: Bearer <admin key>') "
                "or a client certificate listed in frontdoor.admin.client_identities"
            )
        if self._digest is not None and hmac.compare_digest(_digest(key), self._digest):
            return "admin key"
        tenant = self._tenants.lookup(key)
        if tenant is not None:
            raise Forbidden(f"authorization: {tenant.role} {tenant.name!r} has no admin role")
        raise AuthError("authorization: unknown admin key")
