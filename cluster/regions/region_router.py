"""A region's router across regions: its own backend plus its peers, with health and failover."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.backends.failover import FailoverBackend
from cluster.backends.faults import FaultInjector
from cluster.backends.peer import PeerBackend
from cluster.config import ClusterConfig
from cluster.regions.checker import HealthChecker, Probe
from cluster.regions.health_book import HealthBook
from cluster.types import Backend


@dataclass
class RegionRouter:
    backend: FailoverBackend  # what the front door calls
    book: HealthBook
    checker: HealthChecker
    faults: FaultInjector  # the local backend, as drills can slow it
    peers: list[PeerBackend]

    def start(self) -> None:
        self.checker.start()

    async def stop(self) -> None:
        await self.checker.stop()
        for peer in self.peers:
            await peer.close()


def _local_probe(backend: Backend) -> Probe:
    async def probe(timeout_s: float) -> tuple[bool, str]:
        del timeout_s  # the backend bounds its own call
        return (True, "") if await backend.ready() else (False, "not serving: no replica is ready")

    return probe


def build_peers(cfg: ClusterConfig) -> list[PeerBackend]:
    """One backend per peer; reads their certificates and keys now, so a bad one fails the region's start."""
    return [PeerBackend(p, forwarded_from=cfg.region) for p in cfg.regions.peers]


def build_region_router(cfg: ClusterConfig, local: Backend, peers: list[PeerBackend] | None = None) -> RegionRouter:
    faults = FaultInjector(local)
    peers = build_peers(cfg) if peers is None else peers
    members: dict[str, Backend] = {cfg.region: faults, **{p.peer.name: p for p in peers}}
    book = HealthBook(cfg.regions.health, members, local=cfg.region)
    probes: dict[str, Probe] = {cfg.region: _local_probe(faults), **{p.peer.name: p.check for p in peers}}
    # A single region checks nothing: its front door's own health reporter already watches it.
    checker = HealthChecker(book, probes if peers else {})
    return RegionRouter(FailoverBackend(members, book, cfg.regions, local=cfg.region), book, checker, faults, peers)
