"""One region's server: its Ray cluster, its Serve application, its front door.

``RegionServer(cfg).start()`` starts (or joins) Ray, deploys the Serve app
and opens the gRPC front door; ``stop()`` drains the door and stops what
was started, in reverse. A local Ray cluster gets its own temp dir and
ports, so several regions can run on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

import ray
from ray import serve
from ray._private import ray_constants

from cluster.backends.serve import ServeBackend
from cluster.config import ClusterConfig
from cluster.frontdoor.admin import ADMIN_LINE, AdminService
from cluster.frontdoor.server import FrontDoor
from cluster.preflight import preflight
from cluster.regions.region_router import RegionRouter, build_peers, build_region_router
from cluster.serve.app import ENGINE_DEPLOYMENT, app_name, build_app
from cluster.telemetry.hookup import ServerTelemetry
from cluster.types import DeployError

log = logging.getLogger("levante.region")
DEPLOY_MARGIN_S = 60.0  # Serve's own start-up, on top of the replicas' load_timeout_s


def _say(msg: str) -> None:
    print(f"levante: {msg}", flush=True)


RAY_START_TIMEOUT = "timed out during startup"  # what ray.init raises when its raylet registers late
VLLM_RPC_BASE = "VLLM_RPC_BASE_PATH"  # where vLLM puts its IPC sockets (and leaves them)


def _started_ray_processes() -> dict[str, subprocess.Popen]:
    """The processes ``ray.init`` just started here (GCS, raylet, log monitor...), by type.

    Ray's node object is internal: if it moves, this is empty and ``stop`` cannot tell that Ray
    died under it (it then behaves as before).
    """
    try:
        node = ray._private.worker._global_node
        return {kind: infos[0].process for kind, infos in node.all_processes.items() if infos}
    except Exception as e:  # noqa: BLE001 -- a safeguard, not a requirement
        log.warning("cannot see Ray's processes (%r); a signal to the process group may hang stop", e)
        return {}


def _pids_naming(path: str) -> list[int]:
    """PIDs of this user's processes whose command line names ``path`` (a directory)."""
    needle, me, pids = path.rstrip("/").encode(), os.getpid(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            mine = os.stat(f"/proc/{entry}").st_uid == os.getuid()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if mine and any(a == needle or a.endswith(b"=" + needle) or needle + b"/" in a for a in args):
            pids.append(int(entry))
    return pids


class RegionServer:
    def __init__(
        self,
        cfg: ClusterConfig,
        progress: Callable[[str], None] = _say,
        start_serve: Callable[[], None] | None = None,
        source: str | None = None,
    ):
        self.cfg = cfg
        self.source = source  # the config file, named in preflight errors
        self.progress = progress
        # Set: called in place of serve.start, e.g. to start Serve's own gRPC proxy for benchmarks
        # beside ours (cluster/ops/bench/serve_proxy.py). Serve takes proxy options only when it first starts.
        self.start_serve = start_serve
        self.frontdoor: FrontDoor | None = None
        self.router: RegionRouter | None = None
        self.port: int | None = None
        self.admin_port: int | None = None  # levante.v1.Admin's own port, when frontdoor.admin.enabled
        self.telemetry: ServerTelemetry | None = None  # traces and /metrics of this process
        self._temp_dir: str | None = None
        self._owns_ray = False
        self._ray_procs: dict[str, subprocess.Popen] = {}  # what ray.init started here, by process type

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
        local = ServeBackend(self.cfg)
        self.router = build_region_router(self.cfg, local, peers)
        self.router.book.listeners.append(lambda t: self.progress(f"region health: {t.region} {t.state} ({t.reason})"))
        self.frontdoor = FrontDoor(
            self.cfg.frontdoor,
            self.router.backend,
            self.cfg.region,
            self.cfg.model_name,
            metrics=self.telemetry.metrics,
        )
        admin = self.cfg.frontdoor.admin
        if admin.enabled:  # its own server, on its own port (loopback by default), behind the admin credential
            self.frontdoor.admin = AdminService(self.router, self.frontdoor, local)
        self.port = await self.frontdoor.start()
        if admin.enabled:  # `levante up` reads the bound port from this line (admin.port 0: any free port)
            self.admin_port = self.frontdoor.admin_port
            self.progress(f"{ADMIN_LINE}{admin.host}:{self.admin_port}")
        self.router.start()
        self.telemetry.watch(self.router, local.replica_statuses)
        if self.cfg.telemetry.tracing.enabled:
            self.progress(
                f"tracing to {self.cfg.telemetry.tracing.otlp_endpoint} "
                f"(sample ratio {self.cfg.telemetry.tracing.sample_ratio:g})"
            )
        if self.cfg.regions.peers:
            self.progress("peers: " + ", ".join(f"{p.name} at {p.target}" for p in self.cfg.regions.peers))
            if not any(t.role == "peer" for t in self.cfg.frontdoor.tenants):
                self.progress(
                    "warning: no frontdoor.tenants entry has role: peer, so the peers cannot resume streams "
                    "here, and calls they forward are taken as new ones"
                )
        scheme = "tls" if self.cfg.frontdoor.tls.enabled else "plaintext"
        self.progress(
            f"region {self.cfg.region!r} serving {self.cfg.model_name!r} on "
            f"{self.cfg.frontdoor.host}:{self.port} ({scheme}) after {time.monotonic() - began:.1f}s"
        )
        return self.port

    async def _deploy_app(self) -> None:
        r = self.cfg.replica
        self.progress(
            f"deploying {r.num_replicas} replica(s) x {r.ep_size} expert-parallel rank(s); "
            f"loading the model on every rank..."
        )
        try:  # bounded: a placement group that cannot be satisfied would otherwise wait forever
            await asyncio.wait_for(asyncio.to_thread(self._deploy), r.load_timeout_s + DEPLOY_MARGIN_S)
        except TimeoutError:
            raise DeployError(
                f"{app_name(self.cfg)} not ready after {r.load_timeout_s + DEPLOY_MARGIN_S:g}s "
                f"(replica.load_timeout_s); not enough CPUs/GPUs for the ranks?"
            ) from None

    async def _report_experts(self) -> None:
        """One line on how the experts were split (asks whichever replica answers)."""
        replica = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name(self.cfg))
        try:
            status = await asyncio.wait_for(replica.status.remote(), self.cfg.replica.rank_timeout_s)
        except Exception as e:  # noqa: BLE001 -- a report, not a requirement
            log.warning("could not read a replica's status: %r", e)
            return
        info = status.info
        if info is not None and info.num_expert_params:
            shares = ", ".join(f"rank {r.ep_rank}: {r.num_local_expert_params:,}" for r in status.ranks)
            self.progress(
                f"replica {status.replica}: {info.architecture}, {info.num_expert_params:,} routed-expert "
                f"parameters over {info.ep_size} rank(s) ({shares})"
            )

    def _start_ray(self) -> None:
        rc = self.cfg.ray
        if rc.address:
            self.progress(f"joining Ray at {rc.address}")
            ray.init(address=rc.address, namespace=rc.namespace, logging_level="ERROR")
            return
        for attempt in (1, 2):
            # Unix socket paths under the temp dir must stay short (~100 bytes): keep it near the root.
            self._temp_dir = rc.temp_dir or tempfile.mkdtemp(
                prefix="lv-", dir="/tmp" if os.path.isdir("/tmp") else None
            )
            self.progress(f"starting a local Ray cluster (temp dir {self._temp_dir})")
            try:
                self._init_local_ray()
                break
            except BaseException as e:
                self._kill_ray_leftovers()  # by PID: what this attempt started
                with contextlib.suppress(Exception):
                    ray.shutdown()
                self._remove_temp_dir()
                # Ray waits a fixed 30 s for its raylet to register; a busy machine can take longer, once
                if attempt == 2 or not isinstance(e, Exception) or RAY_START_TIMEOUT not in str(e):
                    raise
                self.progress("Ray's node did not register in time (a busy machine?); starting it once more")
        self._owns_ray = True
        self._ray_procs = _started_ray_processes()

    def _init_local_ray(self) -> None:
        # Ctrl-C in a terminal signals the whole process group. Ray's processes inherit an ignored
        # SIGINT, so the interrupt reaches only us and we drain, then stop them ourselves.
        # (Only the main thread may touch signals; embedded elsewhere, e.g. in tests, we leave them be.)
        rc = self.cfg.ray
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        # Ray's processes inherit it: vLLM's IPC sockets go under the temp dir, removed even after a SIGKILL
        rpc_dir = None if VLLM_RPC_BASE in os.environ else self._temp_dir
        if rpc_dir:
            os.environ[VLLM_RPC_BASE] = rpc_dir
        try:
            ray.init(
                num_cpus=rc.num_cpus,
                namespace=rc.namespace,
                _temp_dir=self._temp_dir,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
            )
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
            if rpc_dir:
                os.environ.pop(VLLM_RPC_BASE, None)

    def _deploy(self) -> None:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our progress lines say what matters
        if self.start_serve is None:
            serve.start(proxy_location="Disabled")  # our front door takes the traffic, not Serve's proxies
        else:
            self.start_serve()
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
        lines = [
            f"{name}: {(d.message or '').strip().splitlines()[-1]}"
            for name, d in app.deployments.items()
            if d.message and d.message.strip()
        ]
        return "; ".join(lines)

    async def drain(self) -> None:
        if self.frontdoor is not None:
            self.progress("draining: refusing new calls, finishing running streams")
            await self.frontdoor.drain()

    async def stop(self) -> None:
        if self.frontdoor is None and not ray.is_initialized():
            await self._stop_telemetry()
            return  # nothing was started (a bad port, say)
        if not self.ray_lost():  # without Ray the running streams cannot finish: no drain to wait for
            await self.drain()
        await self._stop_door_and_router()
        await self._stop_telemetry()  # after the drain, so the last calls' spans leave too
        if ray.is_initialized() and not self.ray_lost():
            finished = await self._ray_call("serve.delete", lambda: serve.delete(app_name(self.cfg)))
            if finished and self._owns_ray:  # our cluster: its end ends Serve's controller too
                ray.shutdown()  # it stops the GCS and raylet itself: from here their exit is no loss
                self._ray_procs = {}
        if self.ray_lost():
            self.progress(
                "Ray's GCS or raylet exited under us (a signal to the whole process group?); "
                "killing what is left of its processes"
            )
            self._kill_ray_leftovers()
        if self._owns_ray:
            self._remove_temp_dir()
        self.progress("stopped")

    async def _stop_door_and_router(self) -> None:
        if self.frontdoor is not None:
            await self.frontdoor.stop()
            self.frontdoor = None
        if self.router is not None:
            await self.router.stop()
            self.router = None

    def ray_lost(self) -> bool:
        """Whether the GCS or raylet of the Ray cluster we started has exited.

        A signal to the whole process group (systemd's KillMode=control-group, ``kill -- -PGID``)
        reaches Ray's processes as well as us, and they exit at once. From then on every Ray call
        waits 60 s for the GCS and then Ray ends this process, so stop must notice and not ask.
        """
        core = (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET)
        return any(p.poll() is not None for kind, p in self._ray_procs.items() if kind in core)

    async def _ray_call(self, what: str, call: Callable[[], object]) -> bool:
        """Run a blocking Ray call while watching Ray's processes; False when they exit first.

        A daemon thread, not ``asyncio.to_thread``: a call stuck on a dead GCS must not keep the
        interpreter from exiting. Without an exit, it takes as long as Ray needs (serve.delete
        may take seconds).
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                call()
                error = None
            except Exception as e:  # noqa: BLE001 -- stopping anyway
                error = e
            with contextlib.suppress(RuntimeError):  # the loop may be gone after an abandoned call
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(error))

        threading.Thread(target=run, name=f"levante-{what}", daemon=True).start()
        while not done.done():
            if self.ray_lost():
                return False
            await asyncio.wait([done], timeout=0.2)
        if done.result() is not None:
            log.warning("%s failed: %r", what, done.result())
        return True

    def _kill_ray_leftovers(self) -> None:
        """SIGKILL, by PID, what is left of our Ray cluster: the processes ray.init started, then
        any process whose command line names our temp dir (workers, agents: children of the raylet)."""
        for proc in self._ray_procs.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)  # reap: no zombies left behind
        if self._temp_dir:
            for pid in _pids_naming(self._temp_dir):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    async def _stop_telemetry(self) -> None:
        if self.telemetry is not None:
            await self.telemetry.stop()
            self.telemetry = None

    def _remove_temp_dir(self) -> None:
        """The temp dir we made for our local cluster (never one the config named)."""
        if self._temp_dir and not self.cfg.ray.temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
