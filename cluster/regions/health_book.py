"""The health of every region, as one router (or one client) sees it: plain state, no I/O.

Two signals, as Envoy and gRPC A50 combine them:
- active: a grpc.health.v1 Check on each region every ``interval_s``; ``unhealthy_threshold``
  failures in a row make it unhealthy, ``healthy_threshold`` successes healthy again;
- passive (outlier detection): errors, timeouts and slow first tokens of real requests;
  ``consecutive_failures`` in a row eject the region for ``base_ejection_s`` times the number of
  ejections so far (capped at ``max_ejection_s``); ``cooldown_s`` without one forgets them.
  As Envoy's ``max_ejection_percent``: at most that share of the regions is out at once (one
  ejection is always allowed), and never the last region that takes traffic.

A region takes traffic when it is not ejected and not unhealthy. Every change of state is a
``Transition`` (with its reason), so reports can tell a closed socket from a timeout.
The clock is passed in: tests drive it by hand.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cluster.config import HealthCheckConfig
from cluster.regions.stalls import StallWatch

HEALTHY, UNHEALTHY, EJECTED, UNKNOWN = "healthy", "unhealthy", "ejected", "unknown"
RESTORED = "restored"  # an ejection ran out
LATENCY_WEIGHT = 0.3  # of each new check round trip in the smoothed latency
MAX_TRANSITIONS = 500


@dataclass(frozen=True)
class Transition:
    t: float  # the clock's time (time.time() in servers)
    region: str
    state: str  # HEALTHY | UNHEALTHY | EJECTED | RESTORED
    reason: str


class RegionHealth:
    def __init__(self, name: str, cfg: HealthCheckConfig, local: bool = False):
        self.name, self.cfg, self.local = name, cfg, local
        self.active = UNKNOWN  # until the first check: optimistic, the region may take traffic
        self.ejections = 0
        self.ejected_until = float("-inf")
        self.latency_s: float | None = None
        self.reason = ""
        self._check_ok = self._check_failed = 0  # runs of active results
        self._failures = 0  # run of passive failures
        self._last_ejected = float("-inf")
        self._announced_ejection = False

    def state(self, now: float) -> str:
        return EJECTED if now < self.ejected_until else self.active

    def available(self, now: float) -> bool:
        return now >= self.ejected_until and self.active != UNHEALTHY

    # ---- active checks ---------------------------------------------------------------------------

    def on_check(self, ok: bool, now: float, rtt_s: float | None = None, reason: str = "") -> Transition | None:
        if ok:
            if rtt_s is not None:
                self.latency_s = (
                    rtt_s if self.latency_s is None else (1 - LATENCY_WEIGHT) * self.latency_s + LATENCY_WEIGHT * rtt_s
                )
            self._check_ok, self._check_failed = self._check_ok + 1, 0
            if self.active == UNKNOWN or (self.active == UNHEALTHY and self._check_ok >= self.cfg.healthy_threshold):
                return self._set_active(HEALTHY, now, reason or f"{self._check_ok} good check(s) in a row")
            return None
        self._check_failed, self._check_ok = self._check_failed + 1, 0
        if self.active != UNHEALTHY and self._check_failed >= self.cfg.unhealthy_threshold:
            return self._set_active(UNHEALTHY, now, f"{reason} ({self._check_failed} failed checks in a row)")
        return None

    def _set_active(self, state: str, now: float, reason: str) -> Transition:
        self.active, self.reason = state, reason
        return Transition(now, self.name, state, reason)

    # ---- passive outlier detection ---------------------------------------------------------------

    def on_success(self, now: float) -> None:
        del now
        self._failures = 0

    def on_failure(self, now: float, reason: str, may_eject: bool = True) -> Transition | None:
        """An error or silent stream of a real request; ejects after enough in a row, when ``may_eject``
        (the book's cap). Held back, the run goes on: the next failure asks again."""
        if now < self.ejected_until:
            return None  # already out; requests that were under way are still failing
        self._failures += 1
        if self._failures < self.cfg.consecutive_failures or not may_eject:
            return None
        if now - self._last_ejected > self.cfg.cooldown_s + self._last_duration():
            self.ejections = 0  # a long quiet spell: back off from the start again
        self.ejections += 1
        duration = min(self.cfg.base_ejection_s * self.ejections, self.cfg.max_ejection_s)
        self.ejected_until, self._last_ejected, self._failures = now + duration, now, 0
        self._announced_ejection = True
        self.reason = f"{reason} ({self.cfg.consecutive_failures} failures in a row); ejected for {duration:g}s"
        return Transition(now, self.name, EJECTED, self.reason)

    def _last_duration(self) -> float:
        return min(self.cfg.base_ejection_s * self.ejections, self.cfg.max_ejection_s)

    def poll(self, now: float) -> Transition | None:
        """Call now and then: reports an ejection that ran out."""
        if self._announced_ejection and now >= self.ejected_until:
            self._announced_ejection = False
            return Transition(now, self.name, RESTORED, f"ejection over (ejection {self.ejections})")
        return None


class HealthBook:
    """Every region's ``RegionHealth`` plus the transitions they made, oldest first."""

    def __init__(
        self,
        cfg: HealthCheckConfig,
        regions: Iterable[str],
        local: str | None = None,
        clock: Callable[[], float] | None = None,
    ):
        import time

        self.cfg = cfg
        self.clock = clock or time.time
        self.local = local
        self.regions = {name: RegionHealth(name, cfg, name == local) for name in regions}
        self.transitions: collections.deque[Transition] = collections.deque(maxlen=MAX_TRANSITIONS)
        self.listeners: list[Callable[[Transition], None]] = []
        self.stalls = StallWatch()  # run by the health checker; silence in a stall of this loop is not a region's

    def _record(self, t: Transition | None) -> None:
        if t is not None:
            self.transitions.append(t)
            for listener in self.listeners:
                listener(t)

    def on_check(self, region: str, ok: bool, rtt_s: float | None = None, reason: str = "") -> None:
        self._record(self.regions[region].on_check(ok, self.clock(), rtt_s, reason))

    def on_success(self, region: str) -> None:
        self.regions[region].on_success(self.clock())

    def on_failure(self, region: str, reason: str) -> None:
        now = self.clock()
        self._record(self.regions[region].on_failure(now, reason, self.may_eject(region, now)))

    def may_eject(self, region: str, now: float) -> bool:
        """The ejection cap: another region still takes traffic, and the ejected share stays within
        ``max_ejection_percent`` (one ejection is always allowed)."""
        if not any(h.available(now) for name, h in self.regions.items() if name != region):
            return False
        ejected = sum(1 for h in self.regions.values() if now < h.ejected_until)
        return ejected == 0 or (ejected + 1) * 100 <= self.cfg.max_ejection_percent * len(self.regions)

    def poll(self) -> None:
        now = self.clock()
        for health in self.regions.values():
            self._record(health.poll(now))

    def available(self, region: str) -> bool:
        return self.regions[region].available(self.clock())
