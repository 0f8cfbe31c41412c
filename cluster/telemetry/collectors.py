"""Metrics read at scrape time from state other parts already keep: the region router's health book
and the engine poller's last answers. Nothing is copied between scrapes; a scrape runs in the
metrics server's thread and only reads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster.telemetry.poller import EnginePoller

if TYPE_CHECKING:
    from cluster.regions.health_book import HealthBook
    from engine.types import EngineStats

REGION_STATES = ("healthy", "unhealthy", "ejected", "unknown")
GROUP_STATES = ("starting", "serving", "restarting", "failed", "stopped")


# One series per replica from its last EngineStats: (kind, name, help, how to read it).
ENGINE_FIGURES: tuple[tuple[type, str, str, Callable[[EngineStats], float]], ...] = (
    (
        GaugeMetricFamily,
        "levante_engine_queue_depth",
        "Requests waiting in the engine's queue",
        lambda st: st.num_waiting,
    ),
    (GaugeMetricFamily, "levante_engine_running_requests", "Requests the engine is running", lambda st: st.num_running),
    (
        GaugeMetricFamily,
        "levante_kv_cache_usage_ratio",
        "Share of the paged KV cache's blocks in use",
        lambda st: st.kv_cache_usage,
    ),
    (GaugeMetricFamily, "levante_kv_cache_used_blocks", "KV cache blocks in use", lambda st: st.num_used_blocks),
    (GaugeMetricFamily, "levante_kv_cache_blocks", "Usable KV cache blocks", lambda st: st.num_blocks),
    (
        GaugeMetricFamily,
        "levante_prefix_cache_hit_rate",
        "Prompt tokens found in the prefix cache / tokens looked up, since start",
        lambda st: st.prefix_cache_hit_rate,
    ),
    (
        CounterMetricFamily,
        "levante_prefix_cache_queried_tokens",
        "Prompt tokens looked up in the prefix cache",
        lambda st: st.prefix_cache_queried_tokens,
    ),
    (
        CounterMetricFamily,
        "levante_prefix_cache_hit_tokens",
        "Prompt tokens found in the prefix cache",
        lambda st: st.prefix_cache_hit_tokens,
    ),
    (
        CounterMetricFamily,
        "levante_preemptions",
        "Requests preempted (KV freed, recomputed later)",
        lambda st: st.num_preemptions,
    ),
)


class RegionHealthCollector(Collector):
    """Each region's health as this region's router sees it (itself included)."""

    def __init__(self, book: HealthBook) -> None:
        self.book = book

    def collect(self) -> Iterator:
        available = GaugeMetricFamily(
            "levante_region_available",
            "1 when the region takes traffic (not ejected, not unhealthy)",
            labels=["region"],
        )
        state = GaugeMetricFamily(
            "levante_region_state", "The region's health state (1 for the current one)", labels=["region", "state"]
        )
        latency = GaugeMetricFamily(
            "levante_region_check_latency_seconds",
            "Smoothed round trip of the region's health checks",
            labels=["region"],
        )
        now = self.book.clock()
        for name, health in list(self.book.regions.items()):
            available.add_metric([name], 1.0 if health.available(now) else 0.0)
            current = health.state(now)
            for s in REGION_STATES:
                state.add_metric([name, s], 1.0 if s == current else 0.0)
            if health.latency_s is not None:
                latency.add_metric([name], health.latency_s)
        yield from (available, state, latency)


class EngineCollector(Collector):
    """The engine replicas' last polled figures, one series per replica (and per rank for expert load)."""

    def __init__(self, poller: EnginePoller) -> None:
        self.poller = poller

    def collect(self) -> Iterator:
        figures = [(kind(name, doc, labels=["replica"]), read) for kind, name, doc, read in ENGINE_FIGURES]
        experts = CounterMetricFamily(
            "levante_expert_routed_tokens",
            "Token-to-expert assignments routed to the experts each expert-parallel rank holds, summed over MoE layers",
            labels=["replica", "ep_rank"],
        )
        state = GaugeMetricFamily(
            "levante_replica_state",
            "The replica's expert-parallel group state (1 for the current one)",
            labels=["replica", "state"],
        )
        restarts = CounterMetricFamily(
            "levante_replica_gang_restarts", "Gang restarts of the replica's group", labels=["replica"]
        )
        age = GaugeMetricFamily(
            "levante_engine_stats_age_seconds", "Age of the replica's last polled figures", labels=["replica"]
        )
        now = time.monotonic()
        for snap in list(self.poller.snapshots.values()):
            r = [snap.replica]
            for s in GROUP_STATES:
                state.add_metric([snap.replica, s], 1.0 if s == snap.state else 0.0)
            restarts.add_metric(r, snap.restarts)
            age.add_metric(r, now - snap.at)
            st = snap.stats
            if st is None:
                continue
            for family, read in figures:
                family.add_metric(r, read(st))
            for rank, load in enumerate(st.expert_load):
                experts.add_metric([snap.replica, str(rank)], load)
        yield from (*(family for family, _ in figures), experts, state, restarts, age)
