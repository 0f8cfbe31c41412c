"""What a failover drill records: requests as the client saw them, the faults injected, health transitions, the SLO.

Times are float seconds since the drill started, on a monotonic clock, so
records from the runner, the faults and the health observers compare
directly. Each record has ``to_dict``/``from_dict`` so a drill's raw records
can be saved next to its report and the report rebuilt from them later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Self


class _Record:
    """JSON-ready round trip for a flat dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        # Unknown keys are skipped so records saved by a newer runner still load.
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Failover(_Record):
    """One hop of one request from a region to the next."""

    from_region: str
    to_region: str
    reason: str  # e.g. "unavailable: connection refused", "timeout: no token for 1.0s", "resource_exhausted"
    at_token: int  # tokens already delivered when it happened (0: before the stream started)
    t: float  # when the next region delivered its first chunk (failover complete)


@dataclass
class RequestRecord(_Record):
    id: str
    sent: float  # when the client sent it
    first_token: float | None
    ended: float
    code: str  # "OK" or a gRPC status name ("UNAVAILABLE", ...)
    first_region: str  # region the client tried first
    region: str  # region that finished it ("" if failed)
    tokens: list[int]  # every token id the client received, in order
    failovers: list[Failover]
    duplicated_tokens: int | None = None  # filled by the replay check (None: not checked)
    lost_tokens: int | None = None
    error: str = ""  # the final error's details as the client saw them ("" when it ended right)

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def latency(self) -> float:
        """End to end: sent until the stream ended (with success or not)."""
        return self.ended - self.sent

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def replay_checked(self) -> bool:
        return self.duplicated_tokens is not None or self.lost_tokens is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        record = super().from_dict(data)
        record.failovers = [f if isinstance(f, Failover) else Failover.from_dict(f) for f in record.failovers]
        return record


@dataclass
class FaultRecord(_Record):
    name: str  # from the scenario, e.g. "kill eu-west"
    kind: str  # kill_region | freeze_region | kill_replica | kill_rank | slow_region | drain_region
    region: str
    at: float  # injected
    restored_at: float | None  # restore done (None: not restored during the drill)


@dataclass
class HealthEvent(_Record):
    """A health transition seen by a region router or the client library."""

    t: float
    observer: str  # "client" or a region name
    region: str  # the region whose health changed
    state: str  # "ejected" | "unhealthy" | "healthy" | "restored"
    reason: str  # e.g. "timeout: health check after 0.5s", "connection refused", "3 consecutive errors"


@dataclass
class SLO(_Record):
    """The limits a drill must meet, from the scenario file; a field left None is not checked."""

    max_failed: int | None = 0
    max_duplicated_tokens: int | None = 0
    max_lost_tokens: int | None = 0
    max_detect_s: float | None = None
    max_failover_s: float | None = None
    max_p99_latency_s: float | None = None  # end-to-end, over the whole drill
    min_requests: int | None = None  # the drill really sent load
