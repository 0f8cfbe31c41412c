"""A real region on Ray with telemetry on: one trace across every process, and /metrics after traffic.

gRPC front door and its replica router (this process) -> EngineReplica (a Serve replica, rank 0 of its
group; rank 1 a Ray actor beside it, ep_size 2). Each process exports its spans over OTLP/gRPC to
a receiver in this process, as they would to a collector. One Ray cluster for the module (own temp
dir, stopped at the end).
"""

from __future__ import annotations

import grpc
import pytest

from cluster.config_loader import config_from_dict
from cluster.telemetry import spans as S
from levante.v1 import inference_pb2 as pb

from ..frontdoor.harness import generate, running_region, wait_until
from .harness import dashboard_metrics, exported_names, filled_buckets, samples, settled_scrape, tokens_of, value
from .receiver import OtlpReceiver
from .spans import began_during, child, describe, in_trace, named, only, traceparent, within

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

REGION = "tele-eu"


def config(otlp_endpoint: str) -> dict:
    return {
        "region": REGION,
        "model_name": "tiny-moe",
        "engine": {
            "model": {
                "model": "tiny:mistral4?seed=0&vocab_size=32768",
                "tokenizer": "mistral-common:mistral_instruct_tokenizer_240323.model.v3",
                "num_threads": 1,
                "max_model_len": 1024,
            },
            "cache": {"num_blocks": 96},
        },
        "replica": {"num_replicas": 1, "ep_size": 2, "cpus_per_rank": 1, "stream_chunk_ms": 10, "rank_timeout_s": 20},
        "frontdoor": {"port": 0},
        "ray": {"num_cpus": 4},
        "telemetry": {
            "tracing": {"enabled": True, "otlp_endpoint": otlp_endpoint, "export_interval_s": 0.2},
            "metrics": {"enabled": True, "port": 0, "poll_interval_s": 0.5},
        },
    }


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def region(loop, receiver):
    with running_region(loop, config_from_dict(config(receiver.endpoint), "test")) as server:
        yield server


def ask(region, metadata=(), max_tokens: int = 8) -> list:
    req = pb.GenerateRequest(prompt="Tell me about the sea.", temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with grpc.insecure_channel(f"127.0.0.1:{region.port}") as ch:
        return generate(ch, req, timeout=120, metadata=metadata)


def test_one_trace_crosses_every_process_under_the_callers_traceparent(region, receiver):
    header, trace_id, caller_span = traceparent()
    assert len(tokens_of(ask(region, metadata=(("traceparent", header),)))) == 8
    wanted = {
        S.FRONTDOOR,
        S.REGION_ROUTER,
        S.REGION_ATTEMPT,
        S.ROUTER,
        S.REPLICA,
        S.ENGINE,
        S.ENGINE_QUEUE,
        S.ENGINE_PREFILL,
        S.ENGINE_DECODE,
    }
    received = receiver.wait_for(
        lambda spans: wanted <= {s.name for s in in_trace(spans, trace_id)},
        60,
        f"spans {sorted(wanted)} of trace {trace_id}",
    )
    trace = in_trace(received, trace_id)
    print(describe(trace))

    door = only(trace, S.FRONTDOOR)
    assert door.parent_id == caller_span  # the client's traceparent was honoured: same trace, its span the parent
    attempt = child(trace, child(trace, door, S.REGION_ROUTER), S.REGION_ATTEMPT)
    router = child(trace, attempt, S.ROUTER)  # the replica router, in the front door's process
    replica = child(trace, router, S.REPLICA)  # across the one Ray call, to the EngineReplica
    engine = child(trace, replica, S.ENGINE)  # its engine (rank 0), in the replica's process
    stages = [child(trace, engine, n) for n in (S.ENGINE_QUEUE, S.ENGINE_PREFILL, S.ENGINE_DECODE)]

    # each hop's process says who it is; all of them are this region's
    components = {s.name: s.resource["levante.component"] for s in (door, router, replica, engine, *stages)}
    assert components == {
        S.FRONTDOOR: "frontdoor",
        S.ROUTER: "frontdoor",
        S.REPLICA: "replica",
        S.ENGINE: "replica",
        S.ENGINE_QUEUE: "replica",
        S.ENGINE_PREFILL: "replica",
        S.ENGINE_DECODE: "replica",
    }
    assert {s.resource["levante.region"] for s in trace} == {REGION}
    assert {s.resource["service.name"] for s in trace} == {"levante"}
    # what each hop decided
    assert router.attributes["levante.effort"] == "none"
    assert router.attributes["levante.replica"] == replica.attributes["levante.replica"]
    assert "replica:" in router.attributes["levante.decision_reason"]
    assert replica.attributes["levante.ep_size"] == 2
    assert engine.attributes["levante.completion_tokens"] == 8
    # nesting is proven by the ids above; times only within one process, and across the Ray hop only
    # that the callee began while its caller ran (tens of ms of skew allowed: a busy machine)
    assert within(router, attempt), describe(trace)
    assert within(engine, replica, slack_ns=2_000_000), describe(trace)  # the engine's times: float seconds
    assert began_during(replica, router), describe(trace)
    assert stages[0].end_ns == stages[1].start_ns and stages[1].end_ns == stages[2].start_ns
    assert len(named(trace, S.ENGINE)) == 1


def scrape_after_poll(region) -> dict:
    poller = region.telemetry.poller
    polls = poller.polls
    wait_until(lambda: poller.polls >= polls + 2, timeout=30, what="a new poll of the replicas")
    return settled_scrape(f"http://127.0.0.1:{region.telemetry.port}/metrics")


def test_metrics_after_traffic(region):
    for _ in range(3):
        assert len(tokens_of(ask(region, max_tokens=6))) == 6
    m = scrape_after_poll(region)
    for histogram in (
        "levante_time_to_first_token_seconds",
        "levante_inter_token_latency_seconds",
        "levante_e2e_request_latency_seconds",
    ):
        assert filled_buckets(m, histogram) > 0, histogram
    assert value(m, "levante_requests_total", code="OK") >= 3
    assert value(m, "levante_generated_tokens_total") >= 18
    # the engine's own figures, polled from the replica's rank 0
    (kv,) = samples(m, "levante_kv_cache_usage_ratio")
    replica = kv.labels["replica"]
    assert 0 <= kv.value <= 1
    assert value(m, "levante_engine_queue_depth", replica=replica) == 0
    assert value(m, "levante_replica_state", replica=replica, state="serving") == 1
    # expert load per EP rank: rank 0 counts every token's routing, binned by whose experts they are
    load = {s.labels["ep_rank"]: s.value for s in samples(m, "levante_expert_routed_tokens_total", replica=replica)}
    print(f"\nexpert load per EP rank: {load}")
    assert set(load) == {"0", "1"} and min(load.values()) > 0


def test_the_dashboard_queries_only_metrics_the_region_exports(region):
    ask(region, max_tokens=2)
    missing = dashboard_metrics() - exported_names(scrape_after_poll(region))
    assert sorted(missing) == []
