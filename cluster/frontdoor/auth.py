"""API keys -> tenants, and each tenant's limits: a token bucket for the request rate, a concurrency cap.

Keys are compared by their SHA-256 digest, so no key is kept or compared in
the clear. ``Tenants`` lives on the front door's event loop: no locks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster.config import TenantConfig

ANONYMOUS = "anonymous"


class AuthError(Exception):
    """The caller is not who it must be (UNAUTHENTICATED)."""


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
    inflight: int = field(default=0, compare=False)


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
    )


class Tenants:
    """Who may call. With no tenants configured every call is the unlimited tenant ``anonymous``."""

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
        return bool(self._by_digest)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Tenant:
        if not self.enabled:
            return self._anonymous
        header = next((v for k, v in metadata if k.lower() == "authorization"), None)
        if not isinstance(header, str):
            raise AuthError("authorization: missing; send metadata 'authorization: Bearer <api key>'")
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("authorization: expected 'Bearer <api key>'")
        tenant = self._by_digest.get(_digest(key.strip()))
        if tenant is None:
            raise AuthError("authorization: unknown API key")
        return tenant

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
