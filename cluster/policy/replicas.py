"""Which replica: prefix affinity, then least outstanding, as plain functions.

No Ray, no I/O: Serve's request router (cluster/serve/request_router.py) passes
in the replicas and their loads, so every rule is a table-driven unit test.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from cluster.policy.effort import render_prompt
from cluster.types import Prompt


def prefix_key(prompt: Prompt, prefix_chars: int, salt: str | None = None) -> str | None:
    """A hash of the prompt's first ``prefix_chars`` characters, or None for an empty prompt.

    Requests with the same key likely share KV blocks, so sending them to one
    replica lets its prefix cache hit. Chat messages are hashed as rendered by
    ``render_prompt``; token ids as their first ``prefix_chars // 4`` ids
    (about 4 characters per token). Each kind is tagged so a text and a token
    list never share a key. ``salt`` (the request's prefix-cache salt) keys
    the hash: requests that cannot share blocks never share affinity, so where
    one tenant's request goes says nothing of another's prompts.
    """
    if not prompt:
        return None
    if isinstance(prompt, str):
        material = "t:" + prompt[:prefix_chars]
    elif isinstance(prompt[0], dict):
        material = "m:" + render_prompt(prompt)[:prefix_chars]
    else:
        material = "i:" + ",".join(str(int(t)) for t in prompt[: max(1, prefix_chars // 4)])
    key = b"" if salt is None else hashlib.blake2b(salt.encode("utf-8", "surrogatepass"), digest_size=32).digest()
    return hashlib.blake2b(material.encode("utf-8", "surrogatepass"), digest_size=16, key=key).hexdigest()


class PrefixAffinity:
    """Which replica last served each prefix: an LRU map of at most ``capacity`` keys."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"capacity: must be positive, got {capacity}")
        self.capacity = capacity
        self._replica_of: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._replica_of)

    def peek(self, key: str) -> str | None:
        """The replica remembered for ``key``, without refreshing its recency."""
        return self._replica_of.get(key)

    def remember(self, key: str, replica_id: str) -> None:
        """Record that ``replica_id`` served ``key`` (now the most recent); evicts the oldest when full."""
        self._replica_of[key] = replica_id
        self._replica_of.move_to_end(key)
        while len(self._replica_of) > self.capacity:
            self._replica_of.popitem(last=False)

    def forget_replica(self, replica_id: str) -> None:
        """Drop every prefix of a replica that went away (its cache went with it)."""
        for key in [k for k, r in self._replica_of.items() if r == replica_id]:
            del self._replica_of[key]


# -- replica choice ----------------------------------------------------------


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    outstanding: int  # requests in flight or queued at the replica
    healthy: bool = True


class NoReplicaAvailable(RuntimeError):
    """No healthy candidate: the caller answers UNAVAILABLE."""


def ranked_replicas(
    candidates: list[ReplicaLoad], prefix_key: str | None, affinity: PrefixAffinity, slack: int
) -> list[tuple[str, str]]:
    """Healthy candidates, most preferred first, each with the reason for its place.

    First the replica that last served this prefix, if its outstanding count
    is within ``slack`` of the least loaded; then the rest by outstanding
    count. Ties break by a hash of (prefix key, replica id) (rendezvous
    hashing): deterministic, the same prefix keeps landing on the same replica
    among equals, and different prefixes spread over them. Without a prefix
    key ties break by replica id. Does not change ``affinity``.
    Raises NoReplicaAvailable when no candidate is healthy.
    """
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        raise NoReplicaAvailable(f"no healthy replica among {len(candidates)} candidates")
    least = min(c.outstanding for c in healthy)
    order = sorted(healthy, key=lambda c: (c.outstanding, _tie_break(prefix_key, c.replica_id), c.replica_id))

    affine_id = affinity.peek(prefix_key) if prefix_key is not None else None
    affine = next((c for c in healthy if c.replica_id == affine_id), None)
    note = ""
    if affine is not None and affine.outstanding <= least + slack:
        order.remove(affine)
        order.insert(0, affine)
        first = (
            f"prefix affinity: {affine.replica_id} served this prefix "
            f"({affine.outstanding} in flight, least {least}, slack {slack})"
        )
    else:
        if affine is not None:
            note = f"; prefix's replica {affine.replica_id} busy ({affine.outstanding} > {least} + {slack})"
        elif affine_id is not None:
            note = f"; prefix's replica {affine_id} unavailable"
        first = f"least outstanding: {order[0].replica_id} ({order[0].outstanding} in flight){note}"
    ranked = [(order[0].replica_id, first)]
    ranked += [(c.replica_id, f"fallback: {c.replica_id} ({c.outstanding} in flight)") for c in order[1:]]
    return ranked


def _tie_break(prefix_key: str | None, replica_id: str) -> str:
    if prefix_key is None:
        return ""
    return hashlib.blake2b(f"{prefix_key}/{replica_id}".encode(), digest_size=8).hexdigest()
