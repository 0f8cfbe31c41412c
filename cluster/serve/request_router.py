"""Serve's request router for engine replicas: our policy plugged into Serve's routing loop.

It runs inside the front door's process (wherever a handle to the
engine deployment lives). Serve hands it the running replicas; the policy
in ``cluster.policy.effort`` ranks them (prefix affinity, then least
outstanding) and Serve tries them in that order, skipping full ones.

The choice rides back on the hint itself (``hint.choice``): Serve keeps a
call's arguments as the caller passed them until it sends them. Serve ships
this module by value, so the hint's class is reached through the ``routing_hint``
module, never imported by name.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.policy.replicas import NoReplicaAvailable, PrefixAffinity, ReplicaLoad, ranked_replicas
from cluster.serve import routing_hint  # by module: this module is pickled by value, routing_hint is not


class LevanteRequestRouter(RequestRouter):
    def initialize_state(self, affinity_entries: int = 4096, affinity_slack: int = 4, **_: object) -> None:
        self._affinity = PrefixAffinity(affinity_entries)
        self._slack = affinity_slack

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hint = pending_request.kwargs.get("hint") if pending_request is not None else None
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: back off, don't spin
        if not isinstance(hint, routing_hint.RoutingHint):
            hint = routing_hint.RoutingHint()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [
            ReplicaLoad(rid, self.replica_queue_len_cache.get(r.replica_id) or 0, healthy=rid not in hint.avoid)
            for rid, r in by_id.items()
        ]
        try:
            ranked = ranked_replicas(loads, hint.prefix_key, self._affinity, self._slack)
        except NoReplicaAvailable:  # every candidate is avoided: try them anyway rather than fail
            ranked = [(rid, "every replica failed recently; trying all") for rid in sorted(by_id)]
        hint.choice = ranked[0]  # a retry after backoff overwrites the earlier try
        return [[by_id[rid]] for rid, _ in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        hint = pending_request.kwargs.get("hint")
        if isinstance(hint, routing_hint.RoutingHint) and hint.prefix_key is not None:
            self._affinity.remember(hint.prefix_key, replica_id.unique_id)  # where it really went

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._affinity.forget_replica(replica_id.unique_id)
