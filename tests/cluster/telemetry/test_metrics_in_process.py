"""The /metrics endpoint of a front door's process after real traffic, in this process (no Ray):
histograms filled, status codes and decisions counted, the engine's figures polled, region health
and failovers; and every metric the Grafana dashboard queries is one the server exports."""

from __future__ import annotations

import grpc
import pytest

from levante.v1 import inference_pb2 as pb

from ..frontdoor.harness import wait_until
from .harness import Region, call, dashboard_metrics, exported_names, filled_buckets, start_all, tokens_of, value

pytestmark = pytest.mark.e2e
SHARED_PREFIX = "You are a patient assistant who answers questions about the weather and the sea. " * 3


@pytest.fixture(scope="module")
def regions(loop, engines):
    """eu (its replica breaks after 2 tokens of any stream) and us, peers of each other; traffic sent once."""
    us = Region(loop, engines["us"], "us", peers=("eu",))
    eu = Region(loop, engines["eu"], "eu", peers=("us",))
    start_all(loop, us, eu)
    ports = {"eu": eu.port, "us": us.port}
    try:
        for i in range(3):  # served in us itself; a shared prefix of several KV blocks, so the cache hits
            assert (
                len(
                    tokens_of(
                        call(
                            ports["us"],
                            prompt=SHARED_PREFIX + f"Tell me about the sea, {i}.",
                            max_tokens=8,
                            ignore_eos=True,
                        )
                    )
                )
                == 8
            )
        call(ports["us"], prompt="Why is the sky blue?", max_tokens=4, reasoning_effort=pb.REASONING_EFFORT_LOW)
        with pytest.raises(grpc.RpcError):
            call(ports["us"], max_tokens=0)  # INVALID_ARGUMENT
        yield {"eu": eu, "us": us}
    finally:
        loop.run(eu.stop())
        loop.run(us.stop())


def test_histograms_fill_and_calls_are_counted_by_status(regions):
    us = regions["us"]
    m = us.scrape()
    assert filled_buckets(m, "levante_time_to_first_token_seconds") == 4
    assert filled_buckets(m, "levante_e2e_request_latency_seconds") == 4
    # each stream's tokens after its first are inter-token gaps
    assert filled_buckets(m, "levante_inter_token_latency_seconds") >= 3 * 7
    assert value(m, "levante_requests_total", code="OK") == 4
    assert value(m, "levante_requests_total", code="INVALID_ARGUMENT") == 1
    assert value(m, "levante_generated_tokens_total") >= 3 * 8
    assert value(m, "levante_prompt_tokens_total") > 0
    assert value(m, "levante_requests_in_flight") == 0
    assert value(m, "levante_reasoning_effort_decisions_total", effort="low", requested="low") == 1
    assert value(m, "levante_reasoning_effort_decisions_total", effort="none", requested="auto") == 3
    assert value(m, "levante_info", region="us", model="tiny-moe") == 1


def test_engine_figures_are_polled_from_the_replica(regions):
    m = regions["us"].scrape_after_poll()
    replica = {"replica": "local-0"}
    assert value(m, "levante_kv_cache_blocks", **replica) == 63  # 64 blocks, the null block excluded
    assert 0 <= value(m, "levante_kv_cache_usage_ratio", **replica) <= 1
    assert value(m, "levante_engine_queue_depth", **replica) == 0
    assert value(m, "levante_engine_running_requests", **replica) == 0
    assert value(m, "levante_prefix_cache_hit_tokens_total", **replica) > 0  # the shared prefix, twice
    assert value(m, "levante_prefix_cache_queried_tokens_total", **replica) > value(
        m, "levante_prefix_cache_hit_tokens_total", **replica
    )
    assert value(m, "levante_preemptions_total", **replica) == 0
    assert value(m, "levante_replica_state", state="serving", **replica) == 1
    # one engine holds every expert: all routed tokens land on rank 0
    assert value(m, "levante_expert_routed_tokens_total", ep_rank="0", **replica) > 0
    assert value(m, "levante_engine_stats_age_seconds", **replica) < 5


def test_region_health_and_a_failover_by_reason(loop, engines, regions):
    us = regions["us"]
    wait_until(
        lambda: value(us.scrape(), "levante_region_state", region="eu", state="healthy") == 1,
        timeout=10,
        what="us to see eu healthy",
    )
    m = us.scrape()
    assert value(m, "levante_region_available", region="eu") == 1
    assert value(m, "levante_region_check_latency_seconds", region="eu") > 0
    assert value(m, "levante_region_health_transitions_total", region="eu", state="healthy") == 1

    broken = Region(loop, engines["eu"], "eu-broken", peers=("us",), break_after=2)
    loop.run(broken.start({"us": us.port}))
    try:
        out = call(broken.port, max_tokens=6, ignore_eos=True)
        assert len(tokens_of(out)) == 6
        m = broken.scrape()
    finally:
        loop.run(broken.stop())
    assert value(m, "levante_region_failovers_total", from_region="eu-broken", reason="unavailable") == 1
    assert value(m, "levante_requests_total", code="OK") == 1


# Exported for operators' own queries and alerts, not charted: the info metric, the one-hot region
# state (availability is charted), raw block counts and the since-start hit rate (the ratio and the
# windowed rate are charted), the poll age, and peer-only metadata ignored from non-peers (for an alert).
NOT_CHARTED = {
    "levante_info",
    "levante_untrusted_metadata_ignored",
    "levante_region_state",
    "levante_kv_cache_used_blocks",
    "levante_kv_cache_blocks",
    "levante_prefix_cache_hit_rate",
    "levante_engine_stats_age_seconds",
}


def _family(name: str) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        name = name.removesuffix(suffix)
    return name


def test_the_dashboard_queries_only_metrics_the_server_exports(regions):
    scraped = regions["us"].scrape_after_poll()
    used = dashboard_metrics()
    print(f"\nthe dashboard queries {len(used)} metrics: {sorted(used)}")
    assert sorted(used - exported_names(scraped)) == [], "the dashboard queries metrics /metrics does not export"
    # and every family the server exports is charted, but those kept for ad-hoc queries
    families = {name for name in scraped if name.startswith("levante_") and not name.endswith("_created")}
    uncharted = families - {_family(n) for n in used}
    assert sorted(uncharted - NOT_CHARTED) == []
