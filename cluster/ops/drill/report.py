"""The drill report: what the recorded requests, faults and health transitions show, checked against the SLO.

Plain functions over the records in cluster/ops/drill/records.py (no gRPC, Ray
or processes), so the report is tested alone on synthetic records.

Definitions:
- latency: end to end, from send to the end of the stream. Its percentiles
  count only requests that succeeded: a request that failed fast would
  otherwise make a fault look cheap, and failures are counted on their own
  (``failed``, ``max_failed``).
- TTFT: send to first token, over every request that got one (a stream that
  started and later failed still had a first token).
- percentiles: nearest rank -- the value at rank ceil(q/100 * n) of the
  sorted values, as in cluster/ops/bench/timing.py -- so a reported p99 is always
  a latency some request really had; null for no values.
- durations in the report are rounded to the microsecond.

The timeline PNG (``write_png``) and the terminal summary
(``format_summary``) live in their own modules and are re-exported here.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from cluster.ops.drill.records import SLO, Failover, FaultRecord, HealthEvent, RequestRecord
from cluster.ops.drill.summary import format_summary
from cluster.ops.drill.timeline import write_png

__all__ = ["build_report", "fault_windows", "format_summary", "percentile", "write_json", "write_png"]

DETECT_STATES = frozenset({"ejected", "unhealthy"})


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile, q in [0, 100]; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    # q * n / 100, not q / 100 * n: 0.07 * 100 is 7.000000000000001, whose ceil would skip a rank.
    rank = max(1, math.ceil(q * len(ordered) / 100))
    return ordered[rank - 1]


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def build_report(
    scenario_name: str,
    requests: Sequence[RequestRecord],
    faults: Sequence[FaultRecord],
    health: Sequence[HealthEvent],
    slo: SLO,
    window_s: float = 5.0,
) -> dict[str, Any]:
    """The whole report as a JSON-serialisable dict (see the module docstring for definitions)."""
    totals = _totals(requests)
    fault_rows = [_fault_report(f, requests, health, window_s) for f in faults]
    checks = _slo_checks(slo, totals, fault_rows, requests)
    return {
        "scenario": scenario_name,
        "window_s": window_s,
        "totals": totals,
        "regions": _regions(requests),
        "faults": fault_rows,
        "slo": checks,
        "passed": all(c["ok"] for c in checks),
    }


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# --- totals and regions -------------------------------------------------------------------------


def _totals(requests: Sequence[RequestRecord]) -> dict[str, Any]:
    failed = [r for r in requests if not r.ok]
    hops = [f for r in requests for f in r.failovers]
    return {
        "sent": len(requests),
        "succeeded": len(requests) - len(failed),
        "failed": len(failed),
        "failed_by_code": dict(sorted(Counter(r.code for r in failed).items())),
        "failovers": len(hops),
        # A request counts once however many times its stream moved.
        "streams_resumed": sum(1 for r in requests if any(f.at_token > 0 for f in r.failovers)),
        # Hops, not requests: each is one more region tried before a token arrived.
        "retried_before_start": sum(1 for f in hops if f.at_token == 0),
        "replay_checked": sum(1 for r in requests if r.replay_checked),
        "duplicated_tokens": _sum_checked(r.duplicated_tokens for r in requests),
        "lost_tokens": _sum_checked(r.lost_tokens for r in requests),
    }


def _sum_checked(values: Iterable[int | None]) -> int | None:
    """Sum over the checked requests; None when none was checked, which is not the same as zero."""
    checked = [v for v in values if v is not None]
    return sum(checked) if checked else None


def _latency_stats(requests: Iterable[RequestRecord]) -> dict[str, float | None]:
    requests = list(requests)
    latencies = [r.latency for r in requests if r.ok]
    ttfts = [t for r in requests if (t := r.ttft) is not None]
    return {
        "latency_p50_s": _r(percentile(latencies, 50)),
        "latency_p99_s": _r(percentile(latencies, 99)),
        "ttft_p50_s": _r(percentile(ttfts, 50)),
        "ttft_p99_s": _r(percentile(ttfts, 99)),
    }


def _regions(requests: Sequence[RequestRecord]) -> dict[str, dict[str, Any]]:
    by_region: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in requests:
        if r.region:  # "" is a request no region finished
            by_region[r.region].append(r)
    return {name: {"finished": len(rs), **_latency_stats(rs)} for name, rs in sorted(by_region.items())}


# --- faults -------------------------------------------------------------------------------------


def fault_windows(fault: FaultRecord, window_s: float) -> dict[str, tuple[float, float] | None]:
    """Half-open [start, end) send-time windows around a fault; ``after`` is None when it was never restored."""
    restored = fault.restored_at
    return {
        "before": (fault.at - window_s, fault.at),
        "during": (fault.at, restored if restored is not None else fault.at + window_s),
        "after": None if restored is None else (restored, restored + window_s),
    }


def _fault_report(
    fault: FaultRecord, requests: Sequence[RequestRecord], health: Sequence[HealthEvent], window_s: float
) -> dict[str, Any]:
    seen = _first_detection(fault, health)
    hop = _first_failover(fault, requests)
    windows = fault_windows(fault, window_s)
    return {
        "name": fault.name,
        "kind": fault.kind,
        "region": fault.region,
        "at": _r(fault.at),
        "restored_at": _r(fault.restored_at),
        "detect_s": _r(seen.t - fault.at) if seen else None,
        # Who saw it and why: "timeout: health check ..." and "connection refused" are different failures.
        "detected_by": seen.observer if seen else None,
        "detect_state": seen.state if seen else None,
        "detect_reason": seen.reason if seen else None,
        "failover_s": _r(hop.t - fault.at) if hop else None,
        "failover_reason": hop.reason if hop else None,
        "returned_s": _r(_returned_s(fault, requests)),
        "windows": {name: _window(requests, span) for name, span in windows.items()},
    }


def _first_detection(fault: FaultRecord, health: Sequence[HealthEvent]) -> HealthEvent | None:
    hits = [h for h in health if h.region == fault.region and h.state in DETECT_STATES and h.t >= fault.at]
    return min(hits, key=lambda h: h.t, default=None)


def _first_failover(fault: FaultRecord, requests: Sequence[RequestRecord]) -> Failover | None:
    hops = [f for r in requests for f in r.failovers if f.from_region == fault.region and f.t >= fault.at]
    return min(hops, key=lambda f: f.t, default=None)


def _returned_s(fault: FaultRecord, requests: Sequence[RequestRecord]) -> float | None:
    """How long after the restore the region finished traffic again, by the first such request's send time."""
    if fault.restored_at is None:
        return None
    sends = [r.sent for r in requests if r.region == fault.region and r.sent >= fault.restored_at]
    return min(sends) - fault.restored_at if sends else None


def _window(requests: Sequence[RequestRecord], span: tuple[float, float] | None) -> dict[str, Any] | None:
    if span is None:
        return None
    start, end = span
    inside = [r for r in requests if start <= r.sent < end]
    return {
        "start": _r(start),
        "end": _r(end),
        "count": len(inside),
        "failed": sum(1 for r in inside if not r.ok),
        **_latency_stats(inside),
    }


# --- SLO ----------------------------------------------------------------------------------------


def _slo_checks(
    slo: SLO, totals: dict[str, Any], faults: list[dict[str, Any]], requests: Sequence[RequestRecord]
) -> list[dict[str, Any]]:
    """One check per SLO field that is set; an actual of None (not measured, or missed) fails the check."""
    actuals = {
        "max_failed": lambda: (totals["failed"], None),
        "max_duplicated_tokens": lambda: _checked_total(totals, "duplicated_tokens"),
        "max_lost_tokens": lambda: _checked_total(totals, "lost_tokens"),
        "max_detect_s": lambda: _worst_over_faults(faults, "detect_s", "never detected"),
        "max_failover_s": lambda: _worst_over_faults(faults, "failover_s", "no failover"),
        "max_p99_latency_s": lambda: _p99_overall(requests),
        "min_requests": lambda: (totals["sent"], None),
    }
    checks = []
    for f in fields(SLO):
        limit = getattr(slo, f.name)
        if limit is None:
            continue
        actual, note = actuals[f.name]()
        ok = actual is not None and (actual >= limit if f.name.startswith("min_") else actual <= limit)
        checks.append({"name": f.name, "limit": limit, "actual": actual, "ok": ok, "note": note})
    return checks


def _checked_total(totals: dict[str, Any], key: str) -> tuple[int | None, str | None]:
    # Unchecked is not zero: a replay check that never ran must not pass a zero-duplicates SLO.
    value = totals[key]
    return value, None if value is not None else f"{key.replace('_', ' ')} not checked on any request"


def _worst_over_faults(faults: list[dict[str, Any]], key: str, missing: str) -> tuple[float | None, str | None]:
    """The largest value over all faults; None when any fault has none (it missed the SLO outright)."""
    if not faults:
        return None, "no faults injected"
    absent = [f["name"] for f in faults if f[key] is None]
    if absent:
        return None, f"{missing}: {', '.join(absent)}"
    return max(f[key] for f in faults), None


def _p99_overall(requests: Sequence[RequestRecord]) -> tuple[float | None, str | None]:
    p99 = _r(percentile((r.latency for r in requests if r.ok), 99))
    return p99, None if p99 is not None else "no request succeeded"
