"""The drill's load: bounded streams through the client library, each recorded as the client saw it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.ops.drill.records import Failover, RequestRecord
from cluster.ops.drill.scenario import LoadSpec
from cluster.regions.region_client import RegionClient
from cluster.types import GRPC_NAMES, Chunk, FailoverHop


@dataclass
class LoadCounters:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    resumed: int = 0
    in_flight: int = 0
    by_region: dict[str, int] = field(default_factory=dict)


def failovers_with_times(
    hops: list[FailoverHop], final_region: str, arrivals: list[tuple[float, int]]
) -> list[Failover]:
    """Each hop, with when the next region's first token arrived (the first arrival past ``at_token``)."""
    out = []
    for i, hop in enumerate(hops):
        to = hops[i + 1].from_region if i + 1 < len(hops) else final_region
        t = next((t for t, count in arrivals if count > hop.at_token), arrivals[-1][0] if arrivals else 0.0)
        out.append(Failover(hop.from_region, to, hop.reason, hop.at_token, t))
    return out


def _code(last: Chunk | None) -> str:
    """The status the client saw: OK, the gRPC name of the final error, or UNKNOWN for a stream cut short."""
    if last is not None and last.error is not None:
        return GRPC_NAMES.get(last.error.code, "UNKNOWN")
    return "OK" if last is not None and last.finished else "UNKNOWN"


class LoadRunner:
    def __init__(self, client: RegionClient, spec: LoadSpec, clock: Callable[[], float]):
        self.client, self.spec, self.clock = client, spec, clock
        self.records: list[RequestRecord] = []
        self.counters = LoadCounters()
        self._ids = itertools.count()

    def params(self, i: int) -> dict:
        s = self.spec
        return dict(max_tokens=s.max_tokens, temperature=s.temperature, seed=s.seed + i, ignore_eos=True)

    async def run(self) -> list[RequestRecord]:
        await asyncio.gather(*(self._worker() for _ in range(self.spec.concurrency)))
        return sorted(self.records, key=lambda r: r.sent)

    async def _worker(self) -> None:
        while True:
            i = next(self._ids)
            if i >= self.spec.requests or self.clock() >= self.spec.max_seconds:
                return
            self.records.append(await self.one(i))

    async def one(self, i: int) -> RequestRecord:
        c = self.counters
        c.sent += 1
        c.in_flight += 1
        first_region = self.client.backend.order(None)[0]
        sent = self.clock()
        tokens: list[int] = []
        arrivals: list[tuple[float, int]] = []
        last: Chunk | None = None
        try:
            async for chunk in self.client.generate(
                self.spec.prompt,
                effort=self.spec.effort,
                request_id=f"drill-{i}",
                timeout_s=self.spec.request_timeout_s,
                **self.params(i),
            ):
                if chunk.token_ids:
                    tokens.extend(chunk.token_ids)
                    arrivals.append((self.clock(), len(tokens)))
                last = chunk
        finally:
            c.in_flight -= 1
        ended = self.clock()
        code = _code(last)
        region = last.served_by.region if code == "OK" and last.served_by else ""
        hops = failovers_with_times(list(last.failovers or []) if last else [], region, arrivals)
        c.ok += code == "OK"
        c.failed += code != "OK"
        c.resumed += any(h.at_token > 0 for h in hops)
        if region:
            c.by_region[region] = c.by_region.get(region, 0) + 1
        return RequestRecord(
            id=f"drill-{i}",
            sent=sent,
            first_token=arrivals[0][0] if arrivals else None,
            ended=ended,
            code=code,
            first_region=first_region,
            region=region,
            tokens=tokens,
            failovers=hops,
            error=last.error.message if last is not None and last.error is not None else "",
        )
