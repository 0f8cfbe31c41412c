"""Region processes on this machine: each ``levante serve`` in its own session (process group), so a
region can be stopped, killed (SIGKILL to every process of the region, Ray's included), frozen
(SIGSTOP) and thawed (SIGCONT) as a whole, and nothing of another region is touched.

The state (pids, ports, logs, Ray temp dirs) is a JSON file in the state dir, so ``levante down``
in another shell stops what ``levante up`` started. The run's keys (admin, peer: fresh random values,
given to each region process in its environment) are kept beside it, readable only by this user.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.frontdoor.admin import ADMIN_LINE
from cluster.ops.ports import reserve_port
from cluster.ops.up.topology import ADMIN_KEY_ENV, PEER_KEY_ENV

STATE_FILE = "regions.json"
KEYS_FILE = "keys.json"
Progress = Callable[[str], None]


class RegionsError(RuntimeError):
    """A region that would not start, or state that does not match what runs."""


@dataclass
class RegionProcess:
    name: str
    pid: int  # the session leader: `levante serve`
    port: int
    config_path: str
    log_path: str
    temp_dir: str  # its Ray cluster's temp dir (ours to remove)
    drain_timeout_s: float = 30.0
    admin: bool = False  # it serves levante.v1.Admin (on admin_port, read from its log once bound)
    admin_port: int = 0
    log_offset: int = 0  # where this run's lines start in log_path (a restarted region appends)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def ready(self) -> bool:
        """Serving, and its admin port known when it has one."""
        return (not self.admin or bool(self.admin_port)) and self.serving(0.5)

    def pids(self) -> list[int]:
        """Every process of the region: all processes in the leader's session."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _stat(int(entry))
                if stat is not None and stat[0] != "Z" and stat[1] == self.pid:  # zombies are gone already
                    out.append(int(entry))
        return out

    def signal_all(self, sig: int) -> int:
        n = 0
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
        return n

    def alive(self) -> bool:
        return bool(self.pids())

    def serving(self, timeout_s: float = 1.0) -> bool:
        with grpc.insecure_channel(self.target) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError:
                return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def new_keys() -> dict[str, str]:
    """This run's admin and peer keys, as the environment variables the region configs name."""
    return {ADMIN_KEY_ENV: secrets.token_urlsafe(32), PEER_KEY_ENV: secrets.token_urlsafe(32)}


class LocalRegions:
    def __init__(self, state_dir: str, keys: dict[str, str] | None = None):
        self.state_dir = os.path.abspath(state_dir)
        self.regions: dict[str, RegionProcess] = {}
        self.configs: dict[str, dict] = {}
        self.keys = keys if keys is not None else new_keys()  # the regions' environment: admin and peer keys

    @property
    def admin_key(self) -> str:
        return self.keys[ADMIN_KEY_ENV]

    @property
    def peer_key(self) -> str:
        return self.keys[PEER_KEY_ENV]

    # ---- state ---------------------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)

    def save(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        with open(self.state_path, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in self.regions.values()], f, indent=2)
        keys = os.path.join(self.state_dir, KEYS_FILE)
        with open(os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            json.dump(self.keys, f)

    @classmethod
    def load(cls, state_dir: str) -> LocalRegions:
        lr = cls(state_dir, keys={})
        try:
            with open(lr.state_path, encoding="utf-8") as f:
                lr.regions = {d["name"]: RegionProcess(**d) for d in json.load(f)}
        except FileNotFoundError:
            raise RegionsError(f"{lr.state_path}: no regions were started from this state dir") from None
        try:
            with open(os.path.join(lr.state_dir, KEYS_FILE), encoding="utf-8") as f:
                lr.keys = json.load(f)
        except FileNotFoundError:
            pass  # stopping needs no key
        return lr

    # ---- starting ------------------------------------------------------------------------------

    def start(self, configs: dict[str, dict], progress: Progress, timeout_s: float = 600.0) -> None:
        """Start every region (in parallel) and return when all serve; stops them all if one fails."""
        self.check_none_running()
        self.configs = configs
        try:
            for name, cfg in configs.items():
                self.regions[name] = self._spawn(name, cfg)
            self.save()
            self.wait_serving(list(configs), progress, timeout_s)
        except BaseException:
            self.stop_all(progress)
            raise

    def check_none_running(self) -> None:
        """Refuse to start over regions an earlier `levante up` with this state dir left running."""
        if os.path.exists(self.state_path) and any(
            r.alive() for r in LocalRegions.load(self.state_dir).regions.values()
        ):
            raise RegionsError(
                f"{self.state_dir}: regions from an earlier `levante up` still run; "
                f"`levante down --state-dir {self.state_dir}` first"
            )

    def _spawn(self, name: str, cfg: dict) -> RegionProcess:
        os.makedirs(self.state_dir, exist_ok=True)
        # Ray's socket paths must stay short: its temp dir sits near the root, not in the state dir.
        temp_dir = tempfile.mkdtemp(prefix=f"lv-{name[:12]}-", dir="/tmp" if os.path.isdir("/tmp") else None)
        cfg = {**cfg, "ray": {**cfg.get("ray", {}), "temp_dir": temp_dir}}
        config_path = os.path.join(self.state_dir, f"{name}.yaml")
        with open(config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        log_path = os.path.join(self.state_dir, f"{name}.log")
        with open(log_path, "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", "cluster.cli", "serve", "--config", config_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.keys},  # never in the config file: only this run's processes know them
            )
        door = cfg.get("frontdoor", {})
        drain = float(door.get("drain_timeout_s", 30.0))
        admin = isinstance(door.get("admin"), dict) and bool(door["admin"].get("enabled"))
        return RegionProcess(
            name, proc.pid, int(door["port"]), config_path, log_path, temp_dir, drain, admin, log_offset=offset
        )

    def restart(self, name: str, progress: Progress, timeout_s: float = 600.0) -> None:
        """Start a region again (after a kill) from the config it had."""
        old = self.regions[name]
        old.signal_all(signal.SIGKILL)
        shutil.rmtree(old.temp_dir, ignore_errors=True)
        with open(old.config_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        deadline = time.monotonic() + 10
        while old.alive() and time.monotonic() < deadline:  # its listener goes with its last process
            time.sleep(0.1)
        try:  # held until the new process binds it: its peers know only this port
            reservation = reserve_port(old.port)
        except OSError as e:
            raise RegionsError(f"region {name}: its port {old.port} was taken while it was down: {e}") from None
        try:
            self.regions[name] = self._spawn(name, cfg)
            self.save()
            self.wait_serving([name], progress, timeout_s)
        finally:
            reservation.close()

    def wait_serving(self, names: Iterable[str], progress: Progress, timeout_s: float = 600.0) -> None:
        names = list(names)
        offsets = {n: self.regions[n].log_offset for n in names}
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            for name in sorted(pending):
                region = self.regions[name]
                offsets[name] = self._relay_log(region, offsets[name], progress)
                if region.ready:
                    pending.discard(name)
                    self.save()  # with the admin port
                    progress(f"{name}: serving on {region.target}")
                elif not _running(region.pid):
                    raise RegionsError(
                        f"region {name} exited while starting; the end of {region.log_path}:\n" + _tail(region.log_path)
                    )
            if pending and time.monotonic() > deadline:
                raise RegionsError(
                    f"regions {sorted(pending)} not serving after {timeout_s:g}s; see their logs in {self.state_dir}"
                )
            if pending:
                time.sleep(0.5)

    @staticmethod
    def _relay_log(region: RegionProcess, offset: int, progress: Progress) -> int:
        """The region's own progress lines (``levante: ...``), prefixed with its name."""
        try:
            with open(region.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return offset
        complete = data.rsplit(b"\n", 1)[0] if b"\n" in data else b""
        for line in complete.decode(errors="replace").splitlines():
            if line.startswith("levante: "):
                progress(f"{region.name}: {line.removeprefix('levante: ')}")
            if line.startswith(f"levante: {ADMIN_LINE}"):  # the port it bound (admin.port 0: any free one)
                region.admin_port = int(line.rsplit(":", 1)[1])
        return offset + len(complete) + (1 if complete else 0)

    # ---- faults and stopping -------------------------------------------------------------------

    def kill(self, name: str) -> int:
        """SIGKILL every process of the region (its Ray cluster included): a region lost at once."""
        return self.regions[name].signal_all(signal.SIGKILL)

    def freeze(self, name: str) -> int:
        return self.regions[name].signal_all(signal.SIGSTOP)

    def thaw(self, name: str) -> int:
        return self.regions[name].signal_all(signal.SIGCONT)

    def stop(self, name: str, progress: Progress) -> None:
        """SIGTERM to `levante serve` (it drains, then stops Ray); SIGKILL to what is left after the drain."""
        region = self.regions[name]
        region.signal_all(signal.SIGCONT)  # a frozen region cannot drain
        try:
            os.kill(region.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + region.drain_timeout_s + 30
        while _running(region.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = region.signal_all(signal.SIGKILL)
        shutil.rmtree(region.temp_dir, ignore_errors=True)
        progress(f"{name}: stopped" + (f" ({left} process(es) killed after the drain)" if left else ""))

    def stop_all(self, progress: Progress) -> None:
        for name in list(self.regions):
            self.stop(name, progress)
        if os.path.exists(self.state_path):
            os.remove(self.state_path)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process from /proc/<pid>/stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return fields[0].decode(), int(fields[3])


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a child we have not reaped yet counts as gone)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
