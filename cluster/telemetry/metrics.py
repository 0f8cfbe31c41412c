"""The Prometheus metrics of one front door's process (docs/observability.md lists them).

Three sources feed one registry:
- each Generate call, observed at the front door (``CallObserver``): latencies, tokens, status
  codes, effort decisions;
- the region router, through listeners: failovers and region health transitions; the current
  health of each region is read from its ``HealthBook`` at scrape time (collectors.py);
- the engine replicas, polled every few seconds (poller.py) and read at scrape time: queue depth,
  KV cache, preemptions, prefix cache, expert load per expert-parallel rank.

Each server has its own registry (never the process-wide one), so several servers can share a
process, as the tests' two regions do.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from cluster.regions.health_book import Transition
    from cluster.types import Chunk, FailoverHop

# Seconds. TTFT spans a cached short prompt to a long prefill behind a queue; ITL a decode step.
TTFT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0)


def reason_kind(reason: str) -> str:
    """``"timeout: no chunk within 2s"`` -> ``"timeout"``: a label with few values."""
    kind = reason.split(":", 1)[0].strip()
    return kind if kind.replace("_", "").isalpha() and len(kind) <= 32 else "other"


class ServerMetrics:
    def __init__(self, region: str, model: str, version: str = "") -> None:
        self.registry = r = CollectorRegistry()
        info = Gauge(
            "levante_info", "This server: its region and model (always 1)", ["region", "model", "version"], registry=r
        )
        info.labels(region, model, version).set(1)
        self.ttft = Histogram(
            "levante_time_to_first_token_seconds",
            "From the call's arrival at the front door to its first token (reasoning included)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "levante_inter_token_latency_seconds",
            "Time between tokens as the front door passes them on; a chunk's gap is spread evenly over its tokens",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "levante_e2e_request_latency_seconds",
            "From arrival to the final message, for calls that ended OK",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.requests = Counter("levante_requests", "Generate calls ended, by gRPC status code", ["code"], registry=r)
        self.in_flight = Gauge("levante_requests_in_flight", "Generate calls running now", registry=r)
        self.generated_tokens = Counter(
            "levante_generated_tokens",
            "Tokens sent to clients (reasoning included); rate() is tokens per second",
            registry=r,
        )
        self.prompt_tokens = Counter("levante_prompt_tokens", "Prompt tokens of calls that ended OK", registry=r)
        self.decisions = Counter(
            "levante_reasoning_effort_decisions",
            "Reasoning depth chosen per call, by effort and by what the caller asked (auto or an explicit effort)",
            ["effort", "requested"],
            registry=r,
        )
        self.failovers = Counter(
            "levante_region_failovers",
            "Requests (or streams) that left a region, by region and kind of reason",
            ["from_region", "reason"],
            registry=r,
        )
        self.transitions = Counter(
            "levante_region_health_transitions",
            "Changes of a region's health as this router sees them",
            ["region", "state"],
            registry=r,
        )
        self.untrusted_metadata = Counter(
            "levante_untrusted_metadata_ignored",
            "Peer-only metadata (forwarded-from, effort ceiling) sent by a caller without the peer role, ignored",
            ["key"],
            registry=r,
        )

    def call(self) -> CallObserver:
        return CallObserver(self)

    def failover(self, hop: FailoverHop) -> None:
        self.failovers.labels(hop.from_region, reason_kind(hop.reason)).inc()

    def transition(self, t: Transition) -> None:
        self.transitions.labels(t.region, t.state).inc()


class CallObserver:
    """One Generate call's figures, fed chunk by chunk as the front door passes them on."""

    __slots__ = ("began", "last", "metrics", "ok", "requested")

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.began = time.monotonic()
        self.last: float | None = None  # when the last token-bearing chunk went out
        self.requested = "unknown"
        metrics.in_flight.inc()

    def chunk(self, chunk: Chunk) -> None:
        m = self.metrics
        if chunk.decision is not None:
            m.decisions.labels(chunk.decision.effort, self.requested).inc()
        n = len(chunk.token_ids)
        if n:
            now = time.monotonic()
            if self.last is None:
                m.ttft.observe(now - self.began)
            else:
                gap = (now - self.last) / n
                for _ in range(n):
                    m.itl.observe(gap)
            self.last = now
            m.generated_tokens.inc(n)
        if chunk.finished and chunk.error is None and chunk.usage is not None:
            m.prompt_tokens.inc(chunk.usage.prompt_tokens)

    def done(self, code: str) -> None:
        m = self.metrics
        m.requests.labels(code).inc()
        if code == "OK":
            m.e2e.observe(time.monotonic() - self.began)
        m.in_flight.dec()  # last: a scrape that sees no call in flight sees every ended call counted
