"""In-process regions with telemetry: a real grpc.aio front door, the region router and a
``LocalBackend`` over a tiny Mistral 4 MoE, plus the process's ``ServerTelemetry`` (metrics
endpoint, engine poller, region listeners). Regions reach each other over gRPC only."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from cluster.backends import LocalBackend
from cluster.config import (
    ClusterConfig,
    FrontDoorConfig,
    HealthCheckConfig,
    MetricsConfig,
    PeerConfig,
    RegionsConfig,
    TelemetryConfig,
    TenantConfig,
)
from cluster.frontdoor import FrontDoor
from cluster.regions.region_router import build_region_router
from cluster.telemetry.hookup import ServerTelemetry
from cluster.types import Backend, ModelInfo
from levante.v1 import inference_pb2 as pb

from ..frontdoor.harness import MODEL, generate, wait_until
from ..regions.fakes import UNBOUND, BreaksAfter, aim_peers

DASHBOARD = Path(__file__).resolve().parents[3] / "helm" / "levante" / "dashboards" / "levante.json"
HEALTH = HealthCheckConfig(interval_s=0.2, timeout_s=0.5, stream_idle_timeout_s=5.0)
# the regions' routers present it to each other: only a peer may resume a stream or forward a call
PEER_KEY_ENV = "LEVANTE_TEST_PEER_KEY"
os.environ.setdefault(PEER_KEY_ENV, "peer-key")
PEERS = (TenantConfig("peers", api_key_env=PEER_KEY_ENV, role="peer"),)


class Region:
    """One region in this process, its front door on a port the kernel picks; ``peers``: the other
    regions' names (``start_all`` aims them at those regions' ports once bound)."""

    def __init__(
        self,
        loop,
        engine,
        name: str,
        peers: tuple[str, ...] = (),
        metrics: bool = True,
        break_after: int | None = None,
    ):
        self.loop, self.name, self.port = loop, name, 0
        self.cfg = ClusterConfig(
            region=name,
            model_name=MODEL,
            frontdoor=FrontDoorConfig(port=0, tenants=PEERS),
            regions=RegionsConfig(
                peers=tuple(PeerConfig(n, UNBOUND, api_key_env=PEER_KEY_ENV) for n in peers), health=HEALTH
            ),
            telemetry=TelemetryConfig(metrics=MetricsConfig(enabled=metrics, port=0, poll_interval_s=0.2)),
        )
        info = loop.run(engine.info())
        self.local = LocalBackend(engine, ModelInfo(MODEL, info.max_model_len), name)
        backend: Backend = self.local if break_after is None else BreaksAfter(self.local, break_after)
        self.router = build_region_router(self.cfg, backend)
        self.telemetry = ServerTelemetry(self.cfg)
        self.door = FrontDoor(self.cfg.frontdoor, self.router.backend, name, MODEL, metrics=self.telemetry.metrics)

    async def start(self, peer_ports: dict[str, int] | None = None) -> None:
        """Bind, then route; ``peer_ports``: where the peers' front doors are (see ``start_all``)."""
        await self.bind()
        await self.serve(peer_ports or {})

    async def bind(self) -> None:
        self.port = await self.door.start()

    async def serve(self, peer_ports: dict[str, int]) -> None:
        aim_peers(self.router, peer_ports)
        self.router.start()
        self.telemetry.watch(self.router, self.local.replica_statuses)
        self.telemetry.serve_metrics()

    async def stop(self) -> None:
        await self.door.stop()
        await self.router.stop()
        await self.telemetry.stop()

    def scrape_after_poll(self) -> dict:
        """A scrape once the engine poller has asked the replica again (after the traffic so far)."""
        polls = self.telemetry.poller.polls
        wait_until(lambda: self.telemetry.poller.polls >= polls + 2, timeout=10, what="a new poll of the engine")
        return self.scrape()

    def scrape(self) -> dict:
        return settled_scrape(f"http://127.0.0.1:{self.telemetry.port}/metrics")


def start_all(loop, *regions: Region) -> None:
    """Regions that are each other's peers: every front door bound first, then every router aimed."""
    for r in regions:
        loop.run(r.bind())
    ports = {r.name: r.port for r in regions}
    for r in regions:
        loop.run(r.serve(ports))


def call(port: int, prompt: str = "Tell me about the sea.", metadata: tuple = (), **fields) -> list:
    req = pb.GenerateRequest(prompt=prompt, temperature=0.0, max_tokens=fields.pop("max_tokens", 8), **fields)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return generate(ch, req, timeout=60, metadata=metadata)


def tokens_of(responses) -> list[int]:
    return [t for r in responses if r.WhichOneof("kind") == "delta" for t in r.delta.token_ids]


def final_of(responses) -> pb.Final:
    assert responses[-1].WhichOneof("kind") == "final", responses[-1]
    return responses[-1].final


# ---- reading a scrape ------------------------------------------------------------------------------


def samples(families: dict, name: str, **labels: str) -> list:
    """Samples called ``name`` (e.g. ``levante_requests_total``) whose labels include ``labels``."""
    return [
        s
        for f in families.values()
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(families: dict, name: str, **labels: str) -> float:
    found = samples(families, name, **labels)
    assert len(found) == 1, f"expected one sample {name}{labels}, found {found}"
    return found[0].value


def exported_names(families: dict) -> set[str]:
    """Every name a query may use: each sample's, and each declared family's (a labelled counter that
    has not counted yet is declared, with its _total name, but has no samples)."""
    names = {s.name for f in families.values() for s in f.samples}
    for f in families.values():
        names.add(f.name)
        if f.type == "counter":
            names.add(f.name + "_total")
        elif f.type == "histogram":
            names.update(f.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def filled_buckets(families: dict, histogram: str) -> int:
    """The count in the +Inf bucket (every observation), after checking the buckets are cumulative."""
    buckets = sorted(samples(families, histogram + "_bucket"), key=lambda s: float(s.labels["le"]))
    assert buckets, f"{histogram}: no buckets"
    counts = [b.value for b in buckets]
    assert counts == sorted(counts), f"{histogram}: buckets are not cumulative: {counts}"
    return int(counts[-1])


def scrape_url(url: str) -> dict:
    """name -> metric family, as Prometheus would read the endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def settled_scrape(url: str) -> dict:
    """The endpoint once no call is in flight: a call is counted just after its last message leaves,
    so a client can hold its answer a moment before the server has counted it."""
    wait_until(
        lambda: samples(scrape_url(url), "levante_requests_in_flight")[0].value == 0,
        timeout=10,
        what="the calls to end at the server",
    )
    return scrape_url(url)


def dashboard_metrics() -> set[str]:
    """Every metric name the shipped Grafana dashboard's PromQL uses."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15, "the dashboard should chart every kind of metric"
    return {name for e in exprs for name in re.findall(r"\blevante_[a-z0-9_]+\b", e)}
