"""``levante up`` / ``levante down`` / ``levante status``."""

from __future__ import annotations

import os

from cluster.config_loader import config_from_dict
from cluster.ops.ports import Reservations
from cluster.ops.up.processes import LocalRegions
from cluster.ops.up.topology import region_configs
from cluster.preflight import preflight

DEFAULT_TOPOLOGY = "configs/two-regions.yaml"
DEFAULT_STATE_DIR = ".levante"


def _say(msg: str) -> None:
    print(f"levante: {msg}", flush=True)


def add_commands(sub) -> None:
    up = sub.add_parser("up", help="start several regions on this machine (one process group and Ray cluster each)")
    up.add_argument("--config", default=DEFAULT_TOPOLOGY, help=f"topology YAML (default {DEFAULT_TOPOLOGY})")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every region to serve")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="drain and stop the regions `levante up` started")
    down.set_defaults(func=_cmd_down)
    status = sub.add_parser("status", help="the regions `levante up` started, and their health")
    status.set_defaults(func=_cmd_status)
    for p in (up, down, status):
        p.add_argument(
            "--state-dir",
            default=DEFAULT_STATE_DIR,
            help=f"where pids, configs and logs are kept (default {DEFAULT_STATE_DIR})",
        )


def _cmd_up(args) -> int:
    regions = LocalRegions(args.state_dir)  # with this run's admin and peer keys
    with Reservations() as reserved:  # ports of port-0 regions, held until every region serves
        configs = region_configs(args.config, reservations=reserved)
        regions.check_none_running()  # first: their ports being taken is not the news
        environ = {**os.environ, **regions.keys}  # what each region process will see
        for name, cfg in configs.items():  # every region's files, variables and ports before any region starts
            preflight(config_from_dict(cfg, args.config), f"{args.config} (region {name})", environ)
        _say(f"starting {len(configs)} region(s): {', '.join(configs)} (logs in {os.path.relpath(regions.state_dir)})")
        regions.start(configs, _say, args.timeout)
    for r in regions.regions.values():
        admin = f", admin on {r.admin_target}" if r.admin else ""
        _say(f"region {r.name}: {r.target} (pid {r.pid}{admin})")
    if any(r.admin for r in regions.regions.values()):
        _say(f"the admin key of this run is in {os.path.join(os.path.relpath(regions.state_dir), 'keys.json')}")
    _say(f"`levante down --state-dir {args.state_dir}` stops them")
    return 0


def _cmd_down(args) -> int:
    LocalRegions.load(args.state_dir).stop_all(_say)
    return 0


def _cmd_status(args) -> int:
    regions = LocalRegions.load(args.state_dir)
    code = 0
    for r in regions.regions.values():
        state = "SERVING" if r.serving() else "running, not serving" if r.alive() else "gone"
        code = code or int(state != "SERVING")
        print(f"{r.name}\t{r.target}\tpid {r.pid}\t{state}")
    return code
