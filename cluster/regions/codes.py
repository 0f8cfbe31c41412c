"""Which errors fail over to the next region, and how a front door's gRPC status becomes a chunk code.

The one rule both the region router and the client library (``cluster.regions.region_client``) follow:

- a region that cannot serve (UNAVAILABLE, and any status that means the call or the peer broke:
  CANCELLED, INTERNAL, UNKNOWN, ...) is the next region's turn;
- a full region (RESOURCE_EXHAUSTED) spills to the next one when ``spill_on_overload`` is on;
- everything about the request itself (who sends it, what it asks for) would get the same answer
  anywhere: UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, FAILED_PRECONDITION and NOT_FOUND
  reach the caller as themselves, with the answering front door's details; so does DEADLINE_EXCEEDED
  (the caller's time is spent).
"""

from __future__ import annotations

import grpc

from cluster.types import (
    DEADLINE_EXCEEDED,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
)

_FROM_GRPC = {
    grpc.StatusCode.UNAVAILABLE: UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED: DEADLINE_EXCEEDED,
    grpc.StatusCode.INVALID_ARGUMENT: INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION: FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND: NOT_FOUND,
}


def from_grpc(status: grpc.StatusCode) -> str:
    """The chunk code of a status a front door answered with; the rest means it could not serve."""
    return _FROM_GRPC.get(status, UNAVAILABLE)


def fails_over(code: str, spill_on_overload: bool = True) -> bool:
    """True when an error before or during the stream sends the request to the next region."""
    return code == UNAVAILABLE or (code == RESOURCE_EXHAUSTED and spill_on_overload)
