"""One replica's expert-parallel group: rank 0 in the replica's process, ranks 1.. as actors, restarted as a gang.

The replica's placement group (Serve's ``placement_group_bundles``) holds one
bundle per rank: bundle 0 is the replica itself, ranks 1.. take the others.
A group is all or nothing: a rank that dies leaves the others blocked in a
collective, so any loss stops rank 0's engine and the worker actors and starts
them all again in the same bundles. While that happens the group reports
``restarting`` and the replica refuses requests with UNAVAILABLE; after
``max_gang_restarts`` failed attempts in a row it reports ``failed`` and the
replica's Serve health check fails, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig, ReplicaConfig
from cluster.config_loader import engine_config_for_rank
from cluster.serve.ranks import WorkerRank, start_rank_engine
from engine.api import Rendezvous, host_rendezvous
from engine.config import EngineConfig
from engine.types import EngineClient, EngineInfo

log = logging.getLogger("levante.ep_group")

STARTING, SERVING, RESTARTING, FAILED, STOPPED = "starting", "serving", "restarting", "failed", "stopped"


def rank_bundles(cfg: ReplicaConfig, num_bundles: int) -> list[dict[str, float]]:
    """``num_bundles`` bundles: CPUs locally, one GPU each in production."""
    bundle: dict[str, float] = {"CPU": cfg.cpus_per_rank}
    if cfg.accelerator == "gpu":
        bundle["GPU"] = 1
    return [dict(bundle) for _ in range(num_bundles)]


def group_shape(cluster: ClusterConfig) -> tuple[int, int]:
    """(bundles in a replica's placement group, GPUs rank 0's actor takes itself).

    Native: one bundle per EP rank, each rank on its bundle's GPU. vLLM: one bundle per device
    of the engine; with several, vLLM's own Ray workers take the GPUs and rank 0 only drives them.
    """
    gpu = cluster.replica.accelerator == "gpu"
    if cluster.engine.backend == "vllm":
        world = cluster.engine.vllm.world_size if gpu else 1
        return world, int(gpu and world == 1)
    return cluster.replica.ep_size, int(gpu)


def rank_configs(cfg: ClusterConfig, init_method: str | None, store_hosted: bool = False) -> list[EngineConfig]:
    """The engine config of each rank: the same model, its own ``ep_rank``; gloo on CPU, NCCL on GPU.

    On GPU a rank's model goes to ``cuda`` unless the config names a device: Ray sets each rank's
    CUDA_VISIBLE_DEVICES to its bundle's GPU, so inside the rank that is ``cuda:0``.
    ``rank_timeout_s`` bounds every collective too: a dead or frozen peer fails the group within it.
    """
    gpu = cfg.replica.accelerator == "gpu"
    configs = [
        engine_config_for_rank(
            cfg,
            r,
            init_method=init_method,
            store_hosted=store_hosted,
            backend="nccl" if gpu else "gloo",
            timeout_s=cfg.replica.rank_timeout_s,
        )
        for r in range(cfg.replica.ep_size)
    ]
    if gpu and cfg.engine.backend == "native" and cfg.engine.model.device is None:  # vLLM places itself
        configs = [dataclasses.replace(c, model=dataclasses.replace(c.model, device="cuda")) for c in configs]
    return configs


class EPGroup:
    """Rank 0's engine in this process (the replica's) and ranks 1.. as actors in the replica's placement group."""

    def __init__(self, cluster: ClusterConfig, name: str = "replica"):
        self.cluster = cluster
        self.cfg = cluster.replica
        self.name = name
        self.state = STARTING
        self.engine: EngineClient | None = None  # rank 0
        self.rank_infos: list[EngineInfo] = []  # every rank's figures, rank 0 first
        self.num_restarts = 0
        self.last_failure = ""
        self._workers: list[Any] = []
        self._worker_runs: list[ray.ObjectRef] = []
        self._watch: asyncio.Task | None = None
        self._rendezvous: Rendezvous | None = None  # hosted here, for the group's life

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> EngineInfo:
        try:
            await self._launch()
        except BaseException:
            await self._teardown(graceful=False)  # no half-started ranks left behind
            raise
        self.state = SERVING
        self._watch = asyncio.create_task(self._watch_loop())
        return self.info

    @property
    def info(self) -> EngineInfo:
        """Rank 0's figures (the engine the replica serves)."""
        return self.rank_infos[0]

    async def stop(self) -> None:
        self.state = STOPPED
        if self._watch is not None:
            self._watch.cancel()
        await self._teardown(graceful=True)

    @property
    def serving(self) -> bool:
        return self.state == SERVING

    def worker_actors(self) -> list[Any]:
        """Ranks 1.., for drills that kill one rank."""
        return list(self._workers)

    async def _launch(self) -> None:
        cfg, timeout = self.cfg, self.cfg.load_timeout_s
        pg = ray.util.get_current_placement_group()  # the replica's (Serve's placement_group_bundles)
        if cfg.ep_size > 1:  # bound before any rank starts, on a port the kernel picks: no race for it
            self._rendezvous = host_rendezvous(ray.util.get_node_ip_address(), cfg.ep_size, cfg.rank_timeout_s)
        init_method = None if self._rendezvous is None else self._rendezvous.init_method
        configs = rank_configs(self.cluster, init_method, store_hosted=self._rendezvous is not None)
        self._workers = [WorkerRank.options(**_on_bundle(pg, r, cfg)).remote() for r in range(1, cfg.ep_size)]
        self._worker_runs = [w.run.remote(c) for w, c in zip(self._workers, configs[1:], strict=True)]
        # vLLM's workers (several GPUs per engine) go into this replica's placement group, one per bundle
        start = asyncio.ensure_future(
            asyncio.to_thread(start_rank_engine, configs[0], pg if self.cluster.engine.backend == "vllm" else None)
        )
        runs = [asyncio.ensure_future(r) for r in self._worker_runs]
        # One deadline for the whole start; a worker that ends first (a load error) says why at once.
        done, _ = await asyncio.wait([start, *runs], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise TimeoutError(f"EP group did not start within {timeout}s")
        if start not in done:
            await next(iter(done))  # re-raises the worker's error
            raise RuntimeError("an expert-parallel rank exited before its group formed")
        self.engine = start.result()  # re-raises rank 0's load error
        workers = await asyncio.wait_for(asyncio.gather(*map(self._joined, self._workers)), cfg.rank_timeout_s)
        self.rank_infos = [await self.engine.info(), *workers]

    @staticmethod
    async def _joined(worker: Any) -> EngineInfo:
        """A worker's figures; it records them a moment after rank 0 sees it join, so ask until then."""
        while (info := await worker.info.remote()) is None:
            await asyncio.sleep(0.05)
        return info

    async def _teardown(self, graceful: bool) -> None:
        """Rank 0 stops first when all is well (it tells the followers to leave the process group
        cleanly); after a loss the workers go first, so a collective stuck on one fails at once."""
        if not graceful:
            self._kill_workers()
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown, self.cfg.rank_timeout_s)
        self._kill_workers()
        if self._rendezvous is not None:  # the next start hosts a new one
            self._rendezvous.close()
            self._rendezvous = None

    def _kill_workers(self) -> None:
        for actor in self._workers:
            ray.kill(actor, no_restart=True)
        self._workers, self._worker_runs = [], []

    # ---- failure detection and gang restart ----------------------------------------------------

    async def _watch_loop(self, interval_s: float = 1.0) -> None:
        try:
            while self.state not in (STOPPED, FAILED):
                await asyncio.sleep(interval_s)
                failure = await self.check()
                if failure:
                    await self.restart(failure)
        except Exception as e:
            log.exception("%s: the EP group watcher failed", self.name)
            self.state, self.last_failure = FAILED, f"watcher failed: {e!r}"

    async def check(self) -> str:
        """'' when every rank is alive and rank 0 serves; otherwise what is wrong."""
        if self._worker_runs:
            ended, _ = ray.wait(self._worker_runs, num_returns=1, timeout=0)
            if ended:
                return f"rank {1 + self._worker_runs.index(ended[0])} exited"
        if self.engine is None or not await self.engine.health():
            return "rank 0 engine is not healthy"
        return ""

    async def restart(self, reason: str) -> None:
        log.warning("%s: EP group lost (%s); restarting the whole gang", self.name, reason)
        self.state, self.last_failure = RESTARTING, reason
        began = time.monotonic()
        for attempt in range(self.cfg.max_gang_restarts + 1):
            await self._teardown(graceful=False)
            try:
                await self._launch()
            except Exception as e:  # noqa: BLE001 -- a failed attempt is retried, then reported
                self.last_failure = f"restart attempt {attempt + 1}: {e!r}"
                await asyncio.sleep(min(2.0**attempt, 10.0))
                continue
            self.state = SERVING
            self.num_restarts += 1
            log.warning("%s: EP group back after %.1fs", self.name, time.monotonic() - began)
            return
        await self._teardown(graceful=False)  # give the resources back; Serve replaces this replica
        self.state = FAILED


def _on_bundle(pg: Any, index: int, cfg: ReplicaConfig) -> dict[str, Any]:
    """A worker rank's actor options: its bundle of the replica's placement group (when there is one)."""
    options: dict[str, Any] = {"num_cpus": cfg.cpus_per_rank, "num_gpus": 1 if cfg.accelerator == "gpu" else 0}
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
    return options
