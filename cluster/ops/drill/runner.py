"""``levante drill``: start the regions, run the load, inject the faults on time, restore, replay,
report (JSON, PNG timeline, terminal summary) and stop everything. Exit code 1 when an SLO is missed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.ops.drill.inject import Injector
from cluster.ops.drill.load import LoadRunner
from cluster.ops.drill.records import FaultRecord, HealthEvent, RequestRecord
from cluster.ops.drill.replay import replay_check
from cluster.ops.drill.report import build_report, format_summary, write_json, write_png
from cluster.ops.drill.scenario import FaultSpec, Scenario, check_faults, load_scenario
from cluster.ops.ports import Reservations
from cluster.ops.up.processes import LocalRegions
from cluster.ops.up.topology import region_configs
from cluster.regions.region_client import RegionClient

Progress = Callable[[str], None]


@dataclass
class DrillResult:
    report: dict
    out_dir: str

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


class _Clock:
    """Seconds since the drill's load started, on the wall clock (regions report wall-clock times)."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self) -> float:
        return time.time() - self.t0

    def of(self, unix_time: float) -> float:
        return unix_time - self.t0


async def _run_faults(
    scenario: Scenario, injector: Injector, clock: _Clock, faults: list[FaultRecord], progress: Progress
) -> None:
    async def one(spec: FaultSpec) -> None:
        await asyncio.sleep(max(0.0, spec.at_s - clock()))
        record = FaultRecord(spec.label, spec.kind, spec.region, clock(), None)
        faults.append(record)
        progress(f"t={record.at:5.1f}s fault: {spec.label}: {await injector.inject(spec)}")
        if spec.duration_s is not None:
            await asyncio.sleep(max(0.0, record.at + spec.duration_s - clock()))
            detail = await injector.restore(spec)
            record.restored_at = clock()
            progress(f"t={record.restored_at:5.1f}s restored: {spec.label}: {detail}")

    await asyncio.gather(*(one(f) for f in scenario.faults))


async def _ticker(load: LoadRunner, client: RegionClient, clock: _Clock, progress: Progress, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        c = load.counters
        now = client.book.clock()
        health = ", ".join(f"{name} {h.state(now)}" for name, h in client.book.regions.items())
        served = ", ".join(f"{r} {n}" for r, n in sorted(c.by_region.items()))
        progress(
            f"t={clock():5.1f}s sent {c.sent}/{load.spec.requests}, ok {c.ok}, failed {c.failed}, "
            f"resumed {c.resumed}, in flight {c.in_flight} | served: {served or '-'} | client sees: {health}"
        )


async def run_drill(
    path: str, out_dir: str, progress: Progress, load_overrides: dict | None = None, tick_s: float = 2.0
) -> DrillResult:
    scenario, topology, overrides = load_scenario(path)
    if load_overrides:
        import dataclasses

        scenario = dataclasses.replace(scenario, load=dataclasses.replace(scenario.load, **load_overrides))
    with Reservations() as reserved:  # ports of port-0 regions, held until every region serves
        configs = region_configs(topology, overrides, reserved)
        check_faults(scenario, list(configs), path)
        os.makedirs(out_dir, exist_ok=True)
        regions = LocalRegions(os.path.join(out_dir, "regions"))
        progress(f"drill {scenario.name!r}: starting {len(configs)} region(s): {', '.join(configs)}")
        await asyncio.to_thread(regions.start, configs, progress, scenario.start_timeout_s)
    try:
        return await _drill(scenario, regions, out_dir, progress, tick_s)
    finally:
        progress("stopping the regions")
        await asyncio.to_thread(regions.stop_all, progress)


async def _drill(
    scenario: Scenario, regions: LocalRegions, out_dir: str, progress: Progress, tick_s: float
) -> DrillResult:
    endpoints = [f"{r.name}={r.target}" for r in regions.regions.values()]
    health: list[HealthEvent] = []
    faults: list[FaultRecord] = []
    # the drill is the operator's own client: with the run's peer key it resumes broken streams in place,
    # as the regions' routers do, so its failover times are the regions' and not a replay's
    async with RegionClient(endpoints, health=scenario.client_health, api_key=regions.peer_key, peer=True) as client:
        clock = _Clock()
        client.book.listeners.append(
            lambda t: health.append(HealthEvent(clock.of(t.t), "client", t.region, t.state, t.reason))
        )
        load = LoadRunner(client, scenario.load, clock)
        injector = Injector(regions, progress, scenario.start_timeout_s)
        s = scenario.load
        progress(
            f"load: up to {s.requests} requests in {s.max_seconds:g}s, {s.concurrency} at a time, "
            f"{s.max_tokens} tokens each; {len(scenario.faults)} fault(s)"
        )
        ticker = asyncio.create_task(_ticker(load, client, clock, progress, tick_s))
        fault_task = asyncio.create_task(_run_faults(scenario, injector, clock, faults, progress))
        try:
            records = await load.run()
            progress(f"t={clock():5.1f}s load done; waiting for the faults' restores")
            await fault_task
        finally:
            ticker.cancel()
            fault_task.cancel()
        progress(f"replaying {sum(r.ok for r in records)} successful streams with the same seeds")
        checked, failed = await replay_check(load, records, s.concurrency)
        progress(f"replay: {checked} streams compared token by token")
        for line in failed:
            progress(f"replay failed, stream left unchecked: {line}")
        for name in regions.regions:
            for t in await injector.region_transitions(name):
                health.append(HealthEvent(clock.of(t.unix_time), name, t.region, t.state, t.reason))
    health.sort(key=lambda e: e.t)
    return _write(scenario, records, faults, health, out_dir, progress)


def _write(
    scenario: Scenario,
    records: list[RequestRecord],
    faults: list[FaultRecord],
    health: list[HealthEvent],
    out_dir: str,
    progress: Progress,
) -> DrillResult:
    report = build_report(scenario.name, records, faults, health, scenario.slo, scenario.window_s)
    write_json(report, os.path.join(out_dir, "report.json"))
    with open(os.path.join(out_dir, "records.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "requests": [r.to_dict() for r in records],
                "faults": [x.to_dict() for x in faults],
                "health": [h.to_dict() for h in health],
            },
            f,
        )
    write_png(scenario.name, records, faults, os.path.join(out_dir, "timeline.png"))
    progress(f"report: {out_dir}/report.json, timeline: {out_dir}/timeline.png")
    print(format_summary(report), flush=True)
    return DrillResult(report, out_dir)


def say(msg: str) -> None:
    print(f"levante: {msg}", file=sys.stdout, flush=True)
