"""The drill report as a few aligned lines for the terminal; reads only the dict ``build_report`` returns."""

from __future__ import annotations

from typing import Any

_WINDOWS = ("before", "during", "after")


def format_summary(report: dict[str, Any]) -> str:
    """Totals, regions, each fault, each SLO check with PASS/FAIL, and an overall PASS/FAIL as the last line."""
    sections = [
        _totals_lines(report),
        _region_lines(report["regions"]),
        *(_fault_lines(f) for f in report["faults"]),
        _slo_lines(report["slo"]),
    ]
    lines = [f"drill {report['scenario']}"]
    for section in sections:
        if section:
            lines += ["", *section]
    lines += ["", f"overall  {_verdict(report['passed'])}"]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def _num(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _pair(a: float | None, b: float | None) -> str:
    """A p50/p99 pair in seconds."""
    if a is None and b is None:
        return "-"
    return f"{_num(a)}/{_num(b)}s"


def _totals_lines(report: dict[str, Any]) -> list[str]:
    t = report["totals"]
    by_code = ", ".join(f"{code} {n}" for code, n in t["failed_by_code"].items())
    by_code = f" ({by_code})" if by_code else ""
    replay = "not checked"
    if t["replay_checked"]:
        replay = (
            f"{t['replay_checked']} checked: {_num(t['duplicated_tokens'])} duplicated, "
            f"{_num(t['lost_tokens'])} lost tokens"
        )
    return [
        f"requests   {t['sent']} sent, {t['succeeded']} succeeded, {t['failed']} failed{by_code}",
        (
            f"failovers  {t['failovers']} hops: {t['streams_resumed']} streams resumed mid-stream, "
            f"{t['retried_before_start']} retries before the first token"
        ),
        f"replay     {replay}",
    ]


def _region_lines(regions: dict[str, dict[str, Any]]) -> list[str]:
    if not regions:
        return []
    width = max(len("region"), *(len(name) for name in regions))
    lines = [f"{'region':<{width}}  {'finished':>8}  {'ttft p50/p99':<16}  latency p50/p99"]
    for name, r in regions.items():
        lines.append(
            f"{name:<{width}}  {r['finished']:>8}  {_pair(r['ttft_p50_s'], r['ttft_p99_s']):<16}  "
            f"{_pair(r['latency_p50_s'], r['latency_p99_s'])}"
        )
    return lines


def _fault_lines(f: dict[str, Any]) -> list[str]:
    restored = f"restored {_s(f['restored_at'])}" if f["restored_at"] is not None else "never restored"
    detect = (
        "never"
        if f["detect_s"] is None
        else (f"{_s(f['detect_s'])} by {f['detected_by']} ({f['detect_state']}: {f['detect_reason']})")
    )
    failover = "none" if f["failover_s"] is None else f"{_s(f['failover_s'])} ({f['failover_reason']})"
    returned = (
        "-"
        if f["restored_at"] is None
        else ("never" if f["returned_s"] is None else f"{_s(f['returned_s'])} after restore")
    )
    lines = [
        f'fault "{f["name"]}" ({f["kind"]} {f["region"]} at {_s(f["at"])}, {restored})',
        f"  detect    {detect}",
        f"  failover  {failover}",
        f"  returned  {returned}",
        f"  {'window':<8}{'sent':>6}{'failed':>8}  {'latency p50/p99':<18}ttft p50/p99",
    ]
    for name in _WINDOWS:
        w = f["windows"][name]
        if w is None:
            lines.append(f"  {name:<8}{'-':>6}")
            continue
        lines.append(
            f"  {name:<8}{w['count']:>6}{w['failed']:>8}  {_pair(w['latency_p50_s'], w['latency_p99_s']):<18}"
            f"{_pair(w['ttft_p50_s'], w['ttft_p99_s'])}"
        )
    return lines


def _slo_lines(checks: list[dict[str, Any]]) -> list[str]:
    if not checks:
        return ["slo  (none set)"]
    width = max(len(c["name"]) for c in checks)
    lines = ["slo"]
    for c in checks:
        note = f"  {c['note']}" if c.get("note") else ""
        lines.append(
            f"  {c['name']:<{width}}  limit {_num(c['limit']):>8}  actual {_num(c['actual']):>8}  "
            f"{_verdict(c['ok'])}{note}"
        )
    return lines
