"""Per-request timings and their summary: time to first token, inter-token latency, tokens/s.

Definitions (docs/benchmarks.md repeats them):
- TTFT: from just before the request is sent to the arrival of the first
  piece carrying at least one token.
- inter-token latency (ITL): a later piece with k tokens arriving g seconds
  after the previous piece gives k samples of g / k (the in-process engine
  streams one token per piece; Levante batches several per chunk, so a
  per-token figure is what compares). Tokens that came with the first piece
  give no sample.
- chunk gap: g itself, one sample per later piece.
- tokens/s: generated tokens over the wall time spent in the measured rounds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    """Arrivals of one request, each (time.perf_counter(), tokens in that piece)."""

    sent: float = field(default_factory=time.perf_counter)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    done: float = 0.0

    def got(self, token_ids: list[int]) -> None:
        if token_ids:
            self.arrivals.append((time.perf_counter(), len(token_ids)))
            self.token_ids.extend(token_ids)

    def finish(self) -> None:
        self.done = time.perf_counter()

    @property
    def ttft(self) -> float:
        return self.arrivals[0][0] - self.sent

    def token_gaps(self) -> list[float]:
        out: list[float] = []
        for (t0, _), (t1, k) in zip(self.arrivals, self.arrivals[1:]):
            out.extend([(t1 - t0) / k] * k)
        return out

    def chunk_gaps(self) -> list[float]:
        return [t1 - t0 for (t0, _), (t1, _) in zip(self.arrivals, self.arrivals[1:])]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class PathStats:
    requests: int
    tokens: int
    wall_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    chunk_gap_p50_ms: float
    chunk_gap_p99_ms: float
    tokens_per_chunk: float  # mean tokens per piece after the first
    tokens_per_s: float


def summarize(timings: list[RequestTiming], wall_s: float) -> PathStats:
    ok = [t for t in timings if t.arrivals]
    ttfts = [t.ttft for t in ok]
    itl = [g for t in ok for g in t.token_gaps()]
    gaps = [g for t in ok for g in t.chunk_gaps()]
    later_tokens = sum(k for t in ok for _, k in t.arrivals[1:])
    tokens = sum(len(t.token_ids) for t in timings)
    ms = 1000.0
    return PathStats(
        requests=len(timings),
        tokens=tokens,
        wall_s=wall_s,
        ttft_p50_ms=percentile(ttfts, 50) * ms,
        ttft_p99_ms=percentile(ttfts, 99) * ms,
        itl_p50_ms=percentile(itl, 50) * ms,
        itl_p99_ms=percentile(itl, 99) * ms,
        chunk_gap_p50_ms=percentile(gaps, 50) * ms,
        chunk_gap_p99_ms=percentile(gaps, 99) * ms,
        tokens_per_chunk=later_tokens / len(gaps) if gaps else math.nan,
        tokens_per_s=tokens / wall_s if wall_s > 0 else math.nan,
    )
