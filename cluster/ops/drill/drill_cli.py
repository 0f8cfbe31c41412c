"""``levante drill --scenario configs/drills/region-outage.yaml``."""

from __future__ import annotations

import asyncio
import os
import signal
import time


def add_commands(sub) -> None:
    p = sub.add_parser(
        "drill", help="run a failover drill: regions, load, timed faults, report; exit 1 when an SLO is missed"
    )
    p.add_argument("--scenario", required=True, help="scenario YAML (configs/drills/*.yaml)")
    p.add_argument("--out", default=None, help="report folder (default drill-reports/<scenario>-<time>)")
    p.add_argument("--requests", type=int, default=None, help="override load.requests")
    p.add_argument("--max-seconds", type=float, default=None, help="override load.max_seconds")
    p.add_argument("--concurrency", type=int, default=None, help="override load.concurrency")
    p.set_defaults(func=_cmd_drill)


def _cmd_drill(args) -> int:
    from cluster.ops.drill.runner import run_drill, say  # grpc, matplotlib and friends: only when a drill runs

    name = os.path.splitext(os.path.basename(args.scenario))[0]
    out = args.out or os.path.join("drill-reports", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = {
        k: v
        for k, v in (("requests", args.requests), ("max_seconds", args.max_seconds), ("concurrency", args.concurrency))
        if v is not None
    }
    result = asyncio.run(_stoppable(run_drill(args.scenario, out, say, overrides)))
    if result is None:
        say("drill stopped before its end; no report")
        return 130
    say(f"drill {'PASSED' if result.passed else 'FAILED'}: {result.out_dir}")
    return 0 if result.passed else 1


async def _stoppable(drill):
    """SIGTERM (and Ctrl-C, as asyncio already does) cancels the drill, which then stops its regions:
    they run in their own sessions, so no signal sent to the drill reaches them."""
    task = asyncio.ensure_future(drill)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return None
