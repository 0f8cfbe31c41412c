"""The drill report dict (``build_report``) on synthetic records with known answers: no gRPC, Ray or processes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cluster.ops.drill.records import SLO
from cluster.ops.drill.report import percentile

from .synthetic import AT, KILL, NO_SLO, STRICT, event, healthy_drill, hop, report, req


def only_fault(rep):
    (fault,) = rep["faults"]
    return fault


def slo_check(rep, name):
    (check,) = [c for c in rep["slo"] if c["name"] == name]
    return check


# --- percentiles --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        (list(range(1, 11)), 50, 5),
        (list(range(1, 11)), 90, 9),
        (list(range(1, 11)), 99, 10),
        (list(range(1, 11)), 0, 1),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 101)), 7, 7),  # 0.07 * 100 is 7.000000000000001 in floats: must not round up to rank 8
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([7.5], 99, 7.5),
        ([], 50, None),
    ],
)
def test_percentile_is_nearest_rank(values, q, expected):
    assert percentile(values, q) == expected


# --- totals and regions -------------------------------------------------------------------------


def test_totals_count_failures_by_code_and_failover_kinds():
    requests = [
        req(
            "a",
            0.0,
            "eu-west",
            failovers=[hop("eu-west", "us-east", 0.5, at_token=0), hop("us-east", "eu-west", 0.7, at_token=4)],
        ),
        req("b", 1.0, "us-east", failovers=[hop("eu-west", "ap-south", 1.2), hop("ap-south", "us-east", 1.4)]),
        req("c", 2.0, "", code="UNAVAILABLE"),
        req("d", 3.0, "", code="UNAVAILABLE", ttft=None),
        req("e", 4.0, "", code="DEADLINE_EXCEEDED"),
    ]
    totals = report(requests, faults=())["totals"]
    assert totals["sent"] == 5
    assert totals["succeeded"] == 2
    assert totals["failed"] == 3
    assert totals["failed_by_code"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}
    assert totals["failovers"] == 4
    assert totals["streams_resumed"] == 1
    assert totals["retried_before_start"] == 3
    assert totals["replay_checked"] == 0
    assert totals["duplicated_tokens"] is None and totals["lost_tokens"] is None


def test_replay_totals_sum_only_checked_requests():
    requests = [
        req("a", 0.0, "eu-west", dup=2, lost=0),
        req("b", 1.0, "eu-west", dup=1, lost=3),
        req("c", 2.0, "eu-west"),
    ]
    totals = report(requests, faults=())["totals"]
    assert (totals["replay_checked"], totals["duplicated_tokens"], totals["lost_tokens"]) == (2, 3, 3)


def test_regions_count_finished_requests_and_their_latencies():
    requests = [
        req(f"e{i}", float(i), "eu-west", latency=lat, ttft=lat / 10) for i, lat in enumerate([1.0, 2.0, 3.0, 4.0])
    ]
    requests += [req("u", 0.0, "us-east", latency=0.5), req("x", 0.0, "", code="UNAVAILABLE")]
    regions = report(requests, faults=())["regions"]
    assert list(regions) == ["eu-west", "us-east"]  # a failed request ("" region) is no region's
    eu = regions["eu-west"]
    assert eu["finished"] == 4
    assert (eu["latency_p50_s"], eu["latency_p99_s"]) == (2.0, 4.0)
    assert (eu["ttft_p50_s"], eu["ttft_p99_s"]) == (0.2, 0.4)
    assert regions["us-east"]["finished"] == 1


# --- faults -------------------------------------------------------------------------------------


def test_detect_is_the_first_ejection_of_the_faulted_region_at_or_after_injection():
    health = [
        event(9.0, "eu-west", "ejected"),  # before the fault
        event(10.2, "us-east", "ejected"),  # another region
        event(10.3, "eu-west", "healthy"),  # not a detection
        event(10.7, "eu-west", "unhealthy", observer="us-east", reason="timeout: health check after 0.5s"),
        event(10.5, "eu-west", "ejected", observer="client", reason="connection refused"),
    ]
    fault = only_fault(report([], health=health))
    assert fault["detect_s"] == 0.5
    assert (fault["detected_by"], fault["detect_state"], fault["detect_reason"]) == (
        "client",
        "ejected",
        "connection refused",
    )


def test_detect_at_the_injection_instant_counts_and_none_is_null():
    assert only_fault(report([], health=[event(AT, "eu-west", "unhealthy")]))["detect_s"] == 0.0
    fault = only_fault(report([], health=[event(9.99, "eu-west", "ejected")]))
    assert fault["detect_s"] is None and fault["detected_by"] is None and fault["detect_reason"] is None


def test_failover_is_the_earliest_hop_away_from_the_faulted_region():
    requests = [
        req("a", 9.0, "us-east", failovers=[hop("eu-west", "us-east", 9.5)]),  # before the fault
        req("b", 9.5, "eu-west", failovers=[hop("us-east", "eu-west", 10.1)]),  # away from another region
        req("c", 9.8, "us-east", failovers=[hop("eu-west", "us-east", 10.8, at_token=3)]),
        req("d", 10.0, "us-east", failovers=[hop("eu-west", "us-east", 10.4, reason="timeout: no token for 1.0s")]),
    ]
    fault = only_fault(report(requests))
    assert fault["failover_s"] == pytest.approx(0.4)
    assert fault["failover_reason"] == "timeout: no token for 1.0s"
    assert only_fault(report(requests[:2]))["failover_s"] is None


def test_returned_is_the_first_send_after_restore_that_finished_in_the_region():
    requests = [
        req("a", 19.9, "eu-west"),  # sent before the restore
        req("b", 20.1, "us-east"),  # other region
        req("c", 20.2, "", code="UNAVAILABLE"),
        req("d", 21.5, "eu-west"),
        req("e", 20.75, "eu-west"),
    ]
    assert only_fault(report(requests))["returned_s"] == 0.75
    assert only_fault(report(requests[:3]))["returned_s"] is None  # traffic never came back
    never = dataclasses.replace(KILL, restored_at=None)
    assert only_fault(report(requests, faults=[never]))["returned_s"] is None


def test_windows_are_half_open_on_send_time():
    edges = [4.999, 5.0, 9.999, 10.0, 19.999, 20.0, 24.999, 25.0]
    windows = only_fault(report([req(str(t), t, "us-east") for t in edges], window_s=5.0))["windows"]
    assert (windows["before"]["start"], windows["before"]["end"]) == (5.0, 10.0)
    assert (windows["during"]["start"], windows["during"]["end"]) == (10.0, 20.0)
    assert (windows["after"]["start"], windows["after"]["end"]) == (20.0, 25.0)
    assert [windows[w]["count"] for w in ("before", "during", "after")] == [2, 2, 2]


def test_window_without_restore_has_a_fixed_during_and_no_after():
    never = dataclasses.replace(KILL, restored_at=None)
    requests = [req("a", 12.0, "us-east"), req("b", 14.999, "us-east"), req("c", 15.0, "us-east")]
    windows = only_fault(report(requests, faults=[never], window_s=5.0))["windows"]
    assert (windows["during"]["end"], windows["during"]["count"]) == (15.0, 2)
    assert windows["after"] is None


def test_window_latency_counts_successes_and_ttft_every_first_token():
    requests = [
        req("a", 11.0, "us-east", latency=1.0, ttft=0.2),
        req("b", 12.0, "us-east", latency=3.0, ttft=0.4),
        req("c", 13.0, "", latency=0.1, ttft=0.1, code="UNAVAILABLE"),  # failed after its first token
        req("d", 14.0, "", latency=0.05, ttft=None, code="UNAVAILABLE"),
    ]
    during = only_fault(report(requests))["windows"]["during"]
    assert (during["count"], during["failed"]) == (4, 2)
    assert (during["latency_p50_s"], during["latency_p99_s"]) == (1.0, 3.0)
    assert (during["ttft_p50_s"], during["ttft_p99_s"]) == (0.2, 0.4)


# --- SLO ----------------------------------------------------------------------------------------


def test_slo_passes_when_every_limit_is_met():
    requests, health = healthy_drill()
    rep = report(requests, health=health, slo=STRICT)
    assert [c["name"] for c in rep["slo"]] == [f.name for f in dataclasses.fields(SLO)]
    assert all(c["ok"] for c in rep["slo"]), rep["slo"]
    assert rep["passed"] is True
    assert slo_check(rep, "max_detect_s")["actual"] == pytest.approx(0.3)
    assert slo_check(rep, "max_p99_latency_s")["actual"] == pytest.approx(1.29)
    json.dumps(rep)  # JSON-serialisable as it is


def test_slo_fields_left_none_are_not_checked():
    requests, health = healthy_drill()
    rep = report(requests, health=health, slo=NO_SLO)
    assert rep["slo"] == [] and rep["passed"] is True


@pytest.mark.parametrize(
    ("name", "change", "actual", "note"),
    [
        ("max_failed", lambda rs, hs: rs.append(req("x", 5.0, "", code="UNAVAILABLE")), 1, None),
        ("max_duplicated_tokens", lambda rs, hs: setattr(rs[3], "duplicated_tokens", 2), 2, None),
        ("max_lost_tokens", lambda rs, hs: setattr(rs[3], "lost_tokens", 1), 1, None),
        (
            "max_lost_tokens",
            lambda rs, hs: [setattr(r, "lost_tokens", None) for r in rs],
            None,
            "lost tokens not checked on any request",
        ),
        ("max_detect_s", lambda rs, hs: hs.__setitem__(0, event(11.5, "eu-west", "ejected")), 1.5, None),
        ("max_detect_s", lambda rs, hs: hs.clear(), None, "never detected: kill eu-west"),
        ("max_failover_s", lambda rs, hs: setattr(rs[10], "failovers", [hop("eu-west", "us-east", 12.0)]), 2.0, None),
        ("max_failover_s", lambda rs, hs: setattr(rs[10], "failovers", []), None, "no failover: kill eu-west"),
        ("max_p99_latency_s", lambda rs, hs: setattr(rs[5], "ended", 9.0), 4.0, None),
        ("min_requests", lambda rs, hs: rs.__delitem__(slice(20, None)), 20, None),
    ],
)
def test_each_slo_fails_on_its_own(name, change, actual, note):
    requests, health = healthy_drill()
    change(requests, health)
    slo = dataclasses.replace(STRICT, min_requests=25)
    rep = report(requests, health=health, slo=slo)
    failing = [c for c in rep["slo"] if not c["ok"]]
    assert [c["name"] for c in failing] == [name]
    if actual is None:
        assert failing[0]["actual"] is None
    else:
        assert failing[0]["actual"] == pytest.approx(actual)
    assert failing[0]["note"] == note
    assert rep["passed"] is False
