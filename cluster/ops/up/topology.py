"""A topology file: which regions to run on this machine, from one base cluster config.

    base: local.yaml          # every region's cluster config (relative to this file; relative paths
                              # in it resolve against its own folder, in overrides against this file's)
    admin: true               # each region serves levante.v1.Admin on its own loopback port, behind an
                              # admin key `levante up` makes per run (drills inject faults through it)
    overrides: {...}          # merged over the base for every region (e.g. regions.health for drills)
    regions:
      - name: eu-west
        port: 50061           # 0: a port the kernel picks, reserved until the region binds it
        overrides: {...}      # this region only

Each region's config is the base, the overrides, then ``region``, ``frontdoor.port``,
``frontdoor.http.port`` (0, any free port, unless set), ``frontdoor.admin`` and ``regions.peers`` (every other region, on loopback) set from here. The
regions' keys are environment variables that ``levante up`` sets for each region process, fresh
random values every run: ``ADMIN_KEY_ENV`` (the admin credential) and ``PEER_KEY_ENV`` (each region
presents it to its peers, and accepts it as a tenant ``PEER_TENANT`` with the peer role, so peers
may resume streams and mark calls as forwarded).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from cluster.config_loader import (
    CLUSTER_CONFIG,
    TOPOLOGY,
    ConfigError,
    build_dataclass,
    check_kind,
    config_from_dict,
    read_yaml,
    resolve_paths,
)
from cluster.ops.ports import Reservations

ADMIN_KEY_ENV = "LEVANTE_ADMIN_KEY"
PEER_KEY_ENV = "LEVANTE_PEER_KEY"
PEER_TENANT = "levante-peers"


@dataclass(frozen=True)
class RegionEntry:
    name: str
    port: int = 0  # 0: a port the kernel picks, reserved until the region binds it

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"name: must be letters, digits, '-' or '_', got {self.name!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")


@dataclass(frozen=True)
class Topology:
    regions: tuple[RegionEntry, ...]
    base: str = "local.yaml"
    admin: bool = True

    def __post_init__(self) -> None:
        names = [r.name for r in self.regions]
        if len(names) < 1:
            raise ValueError("regions: list at least one region")
        if len(names) != len(set(names)):
            raise ValueError("regions: region names must be unique")
        ports = [r.port for r in self.regions if r.port]
        if len(ports) != len(set(ports)):
            raise ValueError("regions: ports must be unique")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _raw(data: dict, key: str, source: str) -> dict:
    value = data.pop(key, None) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
    return value


def _set_frontdoor(cfg: dict, port: int, admin: bool) -> None:
    """The region's port, its admin service (on with the run's admin key), and its peers' key."""
    door = cfg.setdefault("frontdoor", {})
    door["port"] = port
    http = door.get("http", {})
    if isinstance(http, dict) and "port" not in http:  # regions on one machine: each HTTP API on a free port
        door["http"] = {**http, "port": 0}
    if admin and isinstance(door.get("admin", {}), dict):  # the old `admin: true` form: the loader names it
        door["admin"] = {**door.get("admin", {}), "enabled": True, "api_key_env": ADMIN_KEY_ENV}
    peer = {"name": PEER_TENANT, "api_key_env": PEER_KEY_ENV, "role": "peer"}
    tenants = door.get("tenants") or []
    if isinstance(tenants, list):  # anything else: the loader names it
        door["tenants"] = [*tenants, peer]


def region_configs(
    path: str, extra_overrides: dict | None = None, reservations: Reservations | None = None
) -> dict[str, dict[str, Any]]:
    """Every region's cluster config (plain data, checked), in the topology's order.

    A region on port 0 gets a port the kernel picks, kept in ``reservations`` until the caller has
    started the regions (each peer must know it before the region binds it: cluster/ops/ports.py).
    Without ``reservations`` the ports are only chosen, for callers that start nothing.
    """
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    check_kind(data, path, TOPOLOGY)
    here = os.path.dirname(os.path.abspath(path))
    data = dict(data)
    overrides = _merge(resolve_paths(_raw(data, "overrides", path), here), extra_overrides or {})
    entries = data.get("regions")
    per_region = {}
    if isinstance(entries, list):
        entries = [dict(e) if isinstance(e, dict) else e for e in entries]
        for i, e in enumerate(entries):
            if isinstance(e, dict):
                per_region[i] = resolve_paths(_raw(e, "overrides", f"{path}: regions[{i}]"), here)
        data["regions"] = entries
    topo: Topology = build_dataclass(Topology, data, path)
    base_path = os.path.join(here, topo.base)
    base = read_yaml(base_path)
    check_kind(base, base_path, CLUSTER_CONFIG)
    # Absolute from here on: each region's config is written to the state dir and loaded from there.
    base = resolve_paths(base, os.path.dirname(base_path))
    held = Reservations() if reservations is None else reservations
    try:
        ports = {r.name: r.port or held.take(r.name) for r in topo.regions}
    finally:
        if reservations is None:
            held.release()
    out = {}
    for i, r in enumerate(topo.regions):
        cfg = _merge(_merge(base, overrides), per_region.get(i, {}))
        cfg["region"] = r.name
        _set_frontdoor(cfg, ports[r.name], topo.admin)
        cfg.setdefault("regions", {})["peers"] = [
            {"name": o.name, "target": f"127.0.0.1:{ports[o.name]}", "api_key_env": PEER_KEY_ENV}
            for o in topo.regions
            if o.name != r.name
        ]
        config_from_dict(cfg, f"{path} (region {r.name}, base {topo.base})")  # checked now, not in a child process
        out[r.name] = cfg
    return out
