"""Telemetry from the cluster config, for each kind of process.

- The EngineReplica replicas (each rank 0 of its group): ``setup_process_tracing`` with the
  config they already get.
- The front door's process: ``ServerTelemetry`` — its tracing, the metrics registry, the
  ``/metrics`` endpoint, the engine poller and the region router's listeners.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cluster.config import ClusterConfig, MetricsConfig
from cluster.telemetry import tracing
from cluster.telemetry.collectors import EngineCollector, RegionHealthCollector
from cluster.telemetry.metrics import ServerMetrics
from cluster.telemetry.poller import EnginePoller, StatusSource

log = logging.getLogger(__name__)

FRONTDOOR, REPLICA = "frontdoor", "replica"  # levante.component


def setup_process_tracing(cfg: ClusterConfig, component: str) -> bool:
    return tracing.setup_tracing(cfg.telemetry.tracing, cfg.region, component)


class ServerTelemetry:
    """What the front door's process runs for telemetry; each part only when its config turns it on."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.metrics: ServerMetrics | None = None
        if cfg.telemetry.metrics.enabled:
            self.metrics = ServerMetrics(cfg.region, cfg.model_name, tracing.package_version())
        self.poller: EnginePoller | None = None
        self.port: int | None = None  # of /metrics, once serving
        self._server: Any = None
        self._tracing = False

    def start_tracing(self) -> None:
        self._tracing = setup_process_tracing(self.cfg, FRONTDOOR)

    def watch(self, router: Any = None, engines: StatusSource | None = None) -> None:
        """Feed the metrics from a region router (``RegionRouter``: health, failovers) and from the
        replicas' statuses (``engines``: e.g. ``ServeBackend.replica_statuses``)."""
        if self.metrics is None:
            return
        if router is not None:
            self.metrics.registry.register(RegionHealthCollector(router.book))
            router.book.listeners.append(self.metrics.transition)
            router.backend.failover_listeners.append(self.metrics.failover)
        if engines is not None:
            self.poller = EnginePoller(engines, self.cfg.telemetry.metrics.poll_interval_s)
            self.metrics.registry.register(EngineCollector(self.poller))
            self.poller.start()

    def serve_metrics(self) -> int | None:
        """Open ``/metrics``; returns its port (None when metrics are off)."""
        if self.metrics is None:
            return None
        self._server, self.port = serve_registry(self.metrics, self.cfg.telemetry.metrics)
        return self.port

    async def stop(self) -> None:
        if self.poller is not None:
            await self.poller.stop()
            self.poller = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tracing:
            # flushes what is still batched; in a thread, as a slow collector would hold the event loop
            await asyncio.to_thread(tracing.shutdown)
            self._tracing = False


def serve_registry(metrics: ServerMetrics, cfg: MetricsConfig) -> tuple[Any, int]:
    """prometheus_client's HTTP server (a daemon thread) for this registry; errors name the key."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(cfg.port, addr=cfg.host, registry=metrics.registry)
    except OSError as e:
        raise OSError(f"telemetry.metrics.port: cannot bind {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    return server, server.server_address[1]
