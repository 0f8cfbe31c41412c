"""The region health state machine and the routing order, as plain functions on a hand-driven clock."""

from __future__ import annotations

from cluster.config import HealthCheckConfig
from cluster.policy.regions import order_regions
from cluster.regions.health_book import EJECTED, HEALTHY, RESTORED, UNHEALTHY, UNKNOWN, HealthBook, RegionHealth

CFG = HealthCheckConfig(
    unhealthy_threshold=2,
    healthy_threshold=2,
    consecutive_failures=3,
    base_ejection_s=5,
    max_ejection_s=12,
    cooldown_s=30,
)


def test_active_checks_need_runs_to_change_state():
    h = RegionHealth("eu", CFG)
    assert h.state(0) == UNKNOWN and h.available(0)  # optimistic before the first check
    assert h.on_check(True, 0, 0.01).state == HEALTHY  # the first good check makes it healthy at once
    assert h.on_check(False, 1, reason="timeout: x") is None  # one failure is not enough
    assert h.available(1)
    t = h.on_check(False, 2, reason="timeout: x")
    assert t.state == UNHEALTHY and "timeout: x (2 failed checks in a row)" == t.reason and not h.available(2)
    assert h.on_check(True, 3, 0.01) is None and not h.available(3)  # one success is not enough either
    assert h.on_check(True, 4, 0.01).state == HEALTHY and h.available(4)
    assert h.on_check(False, 5) is None and h.on_check(True, 6) is None  # a failure run broken by a success


def test_latency_is_smoothed():
    h = RegionHealth("eu", CFG)
    h.on_check(True, 0, 0.100)
    h.on_check(True, 1, 0.200)
    assert abs(h.latency_s - 0.130) < 1e-9


def test_consecutive_failures_eject_with_backoff_capped_and_cooldown():
    h = RegionHealth("eu", CFG)
    assert h.on_failure(0, "unavailable") is None and h.on_failure(0, "unavailable") is None
    t = h.on_failure(1, "unavailable: connection refused")
    assert t.state == EJECTED and "ejected for 5s" in t.reason and h.state(1) == EJECTED and not h.available(5.9)
    assert h.on_failure(2, "late failures of streams under way") is None  # no double ejection
    assert h.poll(5.9) is None and h.poll(6).state == RESTORED and h.available(6) and h.poll(7) is None
    for _ in range(3):
        t = h.on_failure(7, "timeout")
    assert "ejected for 10s" in t.reason and h.ejections == 2  # second ejection: twice as long
    h.on_failure(17, "x"), h.on_failure(17, "x")
    assert "ejected for 12s" in h.on_failure(17, "x").reason  # capped at max_ejection_s
    # quiet for longer than cooldown after the last ejection ended: the count starts again
    for _ in range(3):
        t = h.on_failure(17 + 12 + 31, "x")
    assert h.ejections == 1 and "ejected for 5s" in t.reason


def test_a_success_resets_the_failure_run():
    h = RegionHealth("eu", CFG)
    h.on_failure(0, "x"), h.on_failure(0, "x")
    h.on_success(0)
    assert h.on_failure(0, "x") is None and h.available(0)


def test_book_records_transitions_and_tells_listeners():
    now = [0.0]
    book = HealthBook(CFG, ["eu", "us"], local="eu", clock=lambda: now[0])
    seen = []
    book.listeners.append(seen.append)
    for _ in range(3):
        book.on_failure("us", "timeout: no first token within 1s")
    now[0] = 5.0
    book.poll()
    assert [(t.region, t.state) for t in book.transitions] == [("us", EJECTED), ("us", RESTORED)]
    assert seen == list(book.transitions) and book.regions["eu"].local and not book.regions["us"].local


def _regions(latencies, down=()):
    out = []
    for name, latency in latencies.items():
        h = RegionHealth(name, CFG)
        if latency is not None:
            h.on_check(True, 0, latency)
        if name in down:
            h.on_check(False, 0), h.on_check(False, 0)
        out.append(h)
    return out


def test_order_preferred_then_local_then_peers_by_latency_then_unavailable():
    regions = _regions({"eu": 0.005, "us": 0.050, "ap": 0.020, "sa": None})
    assert order_regions(regions, 1, first=(None, "eu")) == ["eu", "ap", "us", "sa"]
    assert order_regions(regions, 1, first=("us", "eu")) == ["us", "eu", "ap", "sa"]
    assert order_regions(regions, 1, first=("mars", "eu")) == ["eu", "ap", "us", "sa"]  # unknown preference
    down = _regions({"eu": 0.005, "us": 0.050, "ap": 0.020}, down=("eu",))
    assert order_regions(down, 1, first=(None, "eu")) == ["ap", "us", "eu"]  # unhealthy: last resort


def test_order_keeps_a_clients_list_when_not_by_latency():
    regions = _regions({"b": 0.9, "a": 0.1, "c": None})
    assert order_regions(regions, 1, by_latency=False) == ["b", "a", "c"]
    assert order_regions(regions, 1, first=("c",), by_latency=False) == ["c", "b", "a"]
