"""The router: reasoning depth and replica choice (policy.py holds the pure rules)."""

from cluster.router.policy import (
    NoReplicaAvailable,
    PrefixAffinity,
    ReplicaLoad,
    choose_replica,
    decide_effort,
    decide_for,
    find_keyword,
    prefix_key,
    ranked_replicas,
    render_prompt,
)

__all__ = [
    "NoReplicaAvailable",
    "PrefixAffinity",
    "ReplicaLoad",
    "choose_replica",
    "decide_effort",
    "decide_for",
    "find_keyword",
    "prefix_key",
    "ranked_replicas",
    "render_prompt",
]
