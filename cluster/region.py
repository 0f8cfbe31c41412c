"""One region's server: its Ray cluster, its Serve application, its front door.

``RegionServer(cfg).start()`` starts (or joins) Ray, deploys the Serve app
and opens the gRPC front door; ``stop()`` drains the door and stops what
was started, in reverse. A local Ray cluster gets its own temp dir and
ports, so several regions can run on one machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Callable

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from cluster.config import ClusterConfig
from cluster.frontdoor.admin import AdminService
from cluster.frontdoor.server import FrontDoor
from cluster.preflight import preflight
from cluster.regions.router import RegionRouter, build_peers, build_region_router
from cluster.serve.app import ENGINE_DEPLOYMENT, app_name, build_app
from cluster.serve.backend import ServeBackend
from cluster.telemetry.hookup import ServerTelemetry
from cluster.types import DeployError

log = logging.getLogger("levante.region")
DEPLOY_MARGIN_S = 60.0  # Serve's own start-up, on top of the replicas' load_timeout_s


def _say(msg: str) -> None:
    print(f"levante: {msg}", flush=True)


class RegionServer:
    def __init__(self, cfg: ClusterConfig, progress: Callable[[str], None] = _say,
                 serve_grpc_port: int | None = None, source: str | None = None):
        self.cfg = cfg
        self.source = source  # the config file, named in preflight errors
        self.progress = progress
        # Set: Serve also starts its own gRPC proxy (levante.v1 servicer) on this port, for
        # benchmarks beside it. Serve takes proxy options only when it first starts, hence here.
        self.serve_grpc_port = serve_grpc_port
        self.frontdoor: FrontDoor | None = None
        self.router: RegionRouter | None = None
        self.port: int | None = None
        self.telemetry: ServerTelemetry | None = None  # traces and /metrics of this process
        self._temp_dir: str | None = None
        self._owns_ray = False

    async def start(self) -> int:
        began = time.monotonic()
        preflight(self.cfg, self.source)  # files, variables, ports: before minutes of model loading, not after
        peers = build_peers(self.cfg)  # their credentials, read once (preflight saw the files are readable)
        self.telemetry = ServerTelemetry(self.cfg)
        metrics_port = self.telemetry.serve_metrics()  # early too: a port in use fails now, not after loading
        if metrics_port is not None:
            self.progress(f"metrics on http://{self.cfg.telemetry.metrics.host}:{metrics_port}/metrics")
        self._start_ray()
        self.telemetry.start_tracing()  # after Ray's processes are forked: the exporter's gRPC threads exist from here
        if self.cfg.ray.deploy:
            await self._deploy_app()
        else:
            self.progress(f"attaching to the Serve application {app_name(self.cfg)!r} (ray.deploy is false)")
        await self._report_experts()
        local = ServeBackend(app_name(self.cfg))
        self.router = build_region_router(self.cfg, local, peers)
        self.router.book.listeners.append(
            lambda t: self.progress(f"region health: {t.region} {t.state} ({t.reason})"))
        self.frontdoor = FrontDoor(self.cfg.frontdoor, self.router.backend, self.cfg.region, self.cfg.model_name,
                                   metrics=self.telemetry.metrics)
        if self.cfg.frontdoor.admin:
            self.frontdoor.admin = AdminService(self.router, self.frontdoor, local, self.frontdoor.authenticate)
        self.port = await self.frontdoor.start()
        self.router.start()
        self.telemetry.watch(self.router, local.replica_statuses)
        if self.cfg.telemetry.tracing.enabled:
            self.progress(f"tracing to {self.cfg.telemetry.tracing.otlp_endpoint} "
                          f"(sample ratio {self.cfg.telemetry.tracing.sample_ratio:g})")
        if self.cfg.regions.peers:
            self.progress("peers: " + ", ".join(f"{p.name} at {p.target}" for p in self.cfg.regions.peers))
        scheme = "tls" if self.cfg.frontdoor.tls.enabled else "plaintext"
        self.progress(f"region {self.cfg.region!r} serving {self.cfg.model_name!r} on "
                      f"{self.cfg.frontdoor.host}:{self.port} ({scheme}) after {time.monotonic() - began:.1f}s")
        return self.port

    async def _deploy_app(self) -> None:
        r = self.cfg.replica
        self.progress(f"deploying {r.num_replicas} replica(s) x {r.ep_size} expert-parallel rank(s); "
                      f"loading the model on every rank...")
        try:  # bounded: a placement group that cannot be satisfied would otherwise wait forever
            await asyncio.wait_for(asyncio.to_thread(self._deploy), r.load_timeout_s + DEPLOY_MARGIN_S)
        except asyncio.TimeoutError:
            raise DeployError(f"{app_name(self.cfg)} not ready after {r.load_timeout_s + DEPLOY_MARGIN_S:g}s "
                              f"(replica.load_timeout_s); not enough CPUs/GPUs for the ranks?") from None

    async def _report_experts(self) -> None:
        """One line on how the experts were split (asks whichever replica answers)."""
        replica = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name(self.cfg))
        try:
            status = await asyncio.wait_for(replica.status.remote(), self.cfg.replica.rank_timeout_s)
        except Exception as e:  # noqa: BLE001 -- a report, not a requirement
            log.warning("could not read a replica's status: %r", e)
            return
        info = status["info"]
        if info.num_expert_params:
            shares = ", ".join(f"rank {r.ep_rank}: {r.num_local_expert_params:,}" for r in status["ranks"] if r)
            self.progress(f"replica {status['replica']}: {info.architecture}, {info.num_expert_params:,} routed-expert "
                          f"parameters over {info.ep_size} rank(s) ({shares})")

    def _start_ray(self) -> None:
        rc = self.cfg.ray
        if rc.address:
            self.progress(f"joining Ray at {rc.address}")
            ray.init(address=rc.address, namespace=rc.namespace, logging_level="ERROR")
            return
        # Unix socket paths under the temp dir must stay short (~100 bytes): keep it near the root.
        self._temp_dir = rc.temp_dir or tempfile.mkdtemp(prefix="lv-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.progress(f"starting a local Ray cluster (temp dir {self._temp_dir})")
        # Ctrl-C in a terminal signals the whole process group. Ray's processes inherit an ignored
        # SIGINT, so the interrupt reaches only us and we drain, then stop them ourselves.
        # (Only the main thread may touch signals; embedded elsewhere, e.g. in tests, we leave them be.)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            ray.init(num_cpus=rc.num_cpus, namespace=rc.namespace, _temp_dir=self._temp_dir,
                     _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False)
        except BaseException:
            self._remove_temp_dir()
            raise
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        self._owns_ray = True

    def _deploy(self) -> None:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our progress lines say what matters
        if self.serve_grpc_port is None:
            serve.start(proxy_location="Disabled")  # our front door takes the traffic, not Serve's proxies
        else:  # the proxy serves HTTP too: loopback, on a free port (0), so it never takes 8000
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": 0},
                        grpc_options=gRPCOptions(port=self.serve_grpc_port, grpc_servicer_functions=[
                            "levante.v1.inference_pb2_grpc.add_InferenceServicer_to_server"]))
        try:
            serve.run(build_app(self.cfg), name=app_name(self.cfg), route_prefix=None)
        except RuntimeError as e:  # Serve says only "failed"; the replica's own error is in the app status
            raise DeployError(f"deploying {app_name(self.cfg)} failed: {self._deploy_failure() or e}") from None

    def _deploy_failure(self) -> str:
        """The last line of each failing deployment's error (the exception, not the traceback)."""
        try:
            app = serve.status().applications[app_name(self.cfg)]
        except Exception:  # noqa: BLE001 -- best effort: the caller has a message already
            return ""
        lines = [f"{name}: {(d.message or '').strip().splitlines()[-1]}"
                 for name, d in app.deployments.items() if d.message and d.message.strip()]
        return "; ".join(lines)

    async def drain(self) -> None:
        if self.frontdoor is not None:
            self.progress("draining: refusing new calls, finishing running streams")
            await self.frontdoor.drain()

    async def stop(self) -> None:
        if self.frontdoor is None and not ray.is_initialized():
            await self._stop_telemetry()
            return  # nothing was started (a bad port, say)
        await self.drain()
        if self.frontdoor is not None:
            await self.frontdoor.stop()
            self.frontdoor = None
        if self.router is not None:
            await self.router.stop()
            self.router = None
        await self._stop_telemetry()  # after the drain, so the last calls' spans leave too
        if ray.is_initialized():
            try:
                serve.delete(app_name(self.cfg))
            except Exception as e:  # noqa: BLE001 -- stopping anyway
                log.warning("serve.delete failed: %r", e)
            if self._owns_ray:  # our cluster: its end ends Serve's controller too
                ray.shutdown()
        if self._owns_ray:
            self._remove_temp_dir()
        self.progress("stopped")

    async def _stop_telemetry(self) -> None:
        if self.telemetry is not None:
            await self.telemetry.stop()
            self.telemetry = None

    def _remove_temp_dir(self) -> None:
        """The temp dir we made for our local cluster (never one the config named)."""
        if self._temp_dir and not self.cfg.ray.temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
