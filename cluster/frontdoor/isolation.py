"""Tenant isolation at the front door: request ids per tenant, one call per id, a prefix-cache salt per call.

- The engine's id of a call is ``tenant/client_id`` (tenant names hold no ``/``), so two tenants'
  ids never meet at a replica or in an engine.
- While a call is in flight, another call from the same tenant with the same id is refused with
  INVALID_ARGUMENT naming ``request_id``; the first one is never touched (no id is shared, so
  cancelling the twin cannot abort it).
- Each call's prefix-cache salt is its tenant's group (``frontdoor.tenants[].prefix_cache_group``,
  by default the tenant's own name). A call a peer region forwards carries its first caller's salt
  (``CACHE_SALT`` metadata); it narrows the forwarding tenant's own group, never replaces it, so no
  caller can reach into another tenant's namespace by sending it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator

from cluster.frontdoor.errors import Refusal
from cluster.types import INVALID_ARGUMENT

MAX_SALT_CHARS = 256  # a forwarded salt is our own kind of value: longer is not one


def engine_request_id(tenant: str, client_id: str) -> str:
    """The id the router, the replica and the engine know a call by."""
    return f"{tenant}/{client_id}"


def forwarded_id(engine_id: str, limit: int) -> str:
    """``engine_id`` as a peer front door takes it (at most ``limit`` characters), still one tenant's own:
    cutting a long id would drop its tenant and let two tenants' calls meet at the peer."""
    if len(engine_id) <= limit:
        return engine_id
    return "h:" + hashlib.blake2b(engine_id.encode("utf-8", "surrogatepass"), digest_size=24).hexdigest()


def cache_salt(group: str, forwarded: str | None) -> str:
    """The salt of a call from a tenant in ``group``; ``forwarded``: the salt a forwarding peer sent."""
    if not forwarded:
        return group
    return json.dumps([group, forwarded[:MAX_SALT_CHARS]])  # unambiguous, whatever either holds


class InflightIds:
    """The engine ids of the calls in flight at this front door."""

    def __init__(self) -> None:
        self._ids: set[str] = set()

    @contextlib.asynccontextmanager
    async def claimed(self, engine_id: str, client_id: str) -> AsyncIterator[None]:
        """Hold ``engine_id`` for the call's life; a call whose id is held is refused before it starts."""
        if engine_id in self._ids:
            raise Refusal(
                INVALID_ARGUMENT,
                f"request_id: {client_id[:64]!r} is already in flight; use a new id per call",
                "request_id",
            )
        self._ids.add(engine_id)
        try:
            yield
        finally:
            self._ids.discard(engine_id)
