"""Builders of synthetic drill records with known answers, shared by the drill report tests."""

from __future__ import annotations

from cluster.ops.drill.records import SLO, Failover, FaultRecord, HealthEvent, RequestRecord
from cluster.ops.drill.report import build_report

AT, RESTORED = 10.0, 20.0
KILL = FaultRecord(name="kill eu-west", kind="kill_region", region="eu-west", at=AT, restored_at=RESTORED)
NO_SLO = SLO(max_failed=None, max_duplicated_tokens=None, max_lost_tokens=None)
STRICT = SLO(
    max_failed=0,
    max_duplicated_tokens=0,
    max_lost_tokens=0,
    max_detect_s=1.0,
    max_failover_s=1.0,
    max_p99_latency_s=2.0,
    min_requests=20,
)


def req(
    rid, sent, region, *, latency=1.0, ttft=0.1, code="OK", first_region=None, failovers=(), dup=None, lost=None
) -> RequestRecord:
    return RequestRecord(
        id=rid,
        sent=sent,
        first_token=None if ttft is None else sent + ttft,
        ended=sent + latency,
        code=code,
        first_region=first_region or region or "eu-west",
        region=region,
        tokens=[1, 2, 3],
        failovers=list(failovers),
        duplicated_tokens=dup,
        lost_tokens=lost,
    )


def hop(frm, to, t, at_token=0, reason="unavailable: connection refused") -> Failover:
    return Failover(from_region=frm, to_region=to, reason=reason, at_token=at_token, t=t)


def event(t, region, state, observer="client", reason="connection refused") -> HealthEvent:
    return HealthEvent(t=t, observer=observer, region=region, state=state, reason=reason)


def report(requests, faults=(KILL,), health=(), slo=NO_SLO, window_s=5.0):
    return build_report("region-outage", list(requests), list(faults), list(health), slo, window_s=window_s)


def healthy_drill():
    """A drill that meets STRICT: eu-west down 10-20 s, detected at +0.3 s, failed over at +0.6 s, nothing lost."""
    requests = [
        req(f"r{i}", float(i), "us-east" if AT <= i < RESTORED else "eu-west", latency=1.0 + i / 100, dup=0, lost=0)
        for i in range(30)
    ]
    requests[10].failovers = [hop("eu-west", "us-east", 10.6, at_token=2)]
    health = [event(10.3, "eu-west", "ejected")]
    return requests, health
