"""A drill scenario file: the regions, the load, the timed faults and the SLOs that gate a release.

    name: region-outage
    topology: ../two-regions.yaml        # the regions (relative to this file)
    overrides: {...}                     # merged into every region's config (e.g. faster health checks)
    load: {requests: 80, max_seconds: 40, concurrency: 4, max_tokens: 24}
    faults:
      - {kind: kill_region, region: eu-west, at_s: 6}
    slo: {max_failed: 0, max_duplicated_tokens: 0, max_lost_tokens: 0, max_failover_s: 2.0}

Loaded with the cluster config's mapper: unknown keys, wrong types and bad values are errors
naming the file and the dotted key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cluster.config import HealthCheckConfig
from cluster.config_loader import ConfigError, build_dataclass, read_yaml
from cluster.ops.drill.records import SLO
from engine.config import EFFORTS

FAULT_KINDS = ("kill_region", "freeze_region", "kill_replica", "kill_rank", "slow_region", "drain_region")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True)
class FaultSpec:
    kind: str  # one of FAULT_KINDS
    region: str
    at_s: float  # seconds after the load starts
    # then restore: thaw, lift the delay, end the drain, restart a killed region; for kill_replica and
    # kill_rank (which heal themselves) it only marks when the "after" window starts. None: not restored.
    duration_s: float | None = None
    name: str = ""  # default: "<kind> <region>"
    rank: int = 1  # kill_rank: which expert-parallel rank
    delay_s: float = 3.0  # slow_region: wait before each stream's first chunk

    def __post_init__(self) -> None:
        _check(self.kind in FAULT_KINDS, "kind", f"must be one of {FAULT_KINDS}, got {self.kind!r}")
        _check(self.at_s >= 0, "at_s", "must be >= 0")
        _check(self.duration_s is None or self.duration_s > 0, "duration_s", "must be positive (or null)")
        _check(self.rank >= 1, "rank", "must be >= 1 (rank 0 is the group's driver: kill_replica kills it)")
        _check(0 < self.delay_s <= 600, "delay_s", "must be in (0, 600]")

    @property
    def label(self) -> str:
        return self.name or f"{self.kind} {self.region}"


@dataclass(frozen=True)
class LoadSpec:
    requests: int = 100  # at most this many requests...
    max_seconds: float = 60.0  # ...sent within this long (running streams then finish)
    concurrency: int = 4  # streams in flight at once
    prompt: str = "Write a short story about a lighthouse keeper."
    max_tokens: int = 24
    temperature: float = 1.0  # sampled, each request with its own seed: the replay check is meaningful
    seed: int = 0  # request i uses seed + i
    effort: str = "none"
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "max_tokens"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.requests <= 100_000, "requests", "must be <= 100000 (a drill is bounded)")
        _check(0 < self.max_seconds <= 3600, "max_seconds", "must be in (0, 3600] (a drill is bounded)")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(self.effort in EFFORTS, "effort", f"must be one of {EFFORTS}")
        _check(self.request_timeout_s > 0, "request_timeout_s", "must be positive")
        _check(bool(self.prompt), "prompt", "must not be empty")


@dataclass(frozen=True)
class Scenario:
    name: str
    topology: str  # a topology file (see cluster/ops/up/topology.py), relative to the scenario file
    load: LoadSpec = field(default_factory=LoadSpec)
    faults: tuple[FaultSpec, ...] = ()
    slo: SLO = field(default_factory=SLO)
    window_s: float = 5.0  # latency windows before, during and after each fault
    client_health: HealthCheckConfig = field(default_factory=HealthCheckConfig)  # the shipped defaults
    start_timeout_s: float = 600.0  # for every region to serve (model loading included)

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must not be empty")
        _check(self.window_s > 0, "window_s", "must be positive")
        _check(self.start_timeout_s > 0, "start_timeout_s", "must be positive")


def load_scenario(path: str) -> tuple[Scenario, str, dict]:
    """The scenario, its topology file's path and the overrides for every region's config."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = dict(data)
    overrides = data.pop("overrides", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: overrides: expected a mapping")
    scenario: Scenario = build_dataclass(Scenario, data, path)
    topology = os.path.join(os.path.dirname(os.path.abspath(path)), scenario.topology)
    if not os.path.isfile(topology):
        raise ConfigError(f"{path}: topology: no such file {scenario.topology!r} (relative to the scenario)")
    return scenario, topology, overrides


def check_faults(scenario: Scenario, regions: list[str], source: str) -> None:
    """Every fault names a region of the topology."""
    for i, f in enumerate(scenario.faults):
        if f.region not in regions:
            raise ConfigError(
                f"{source}: faults[{i}].region: {f.region!r} is not a region of the topology ({', '.join(regions)})"
            )
