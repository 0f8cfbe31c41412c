"""Which regions a request tries, in which order: a plain function over the health book."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.regions.health_book import RegionHealth


def order_regions(
    regions: Sequence[RegionHealth], now: float, first: Sequence[str | None] = (), by_latency: bool = True
) -> list[str]:
    """Regions that take traffic, then the others as a last resort.

    Within each group: the names in ``first`` (the preferred region, then the local one) in that
    order, then the rest by smoothed health-check latency (unmeasured last) when ``by_latency``,
    else in the order given (a client's own list of endpoints).
    """
    position = {r.name: i for i, r in enumerate(regions)}
    pinned = [name for name in dict.fromkeys(first) if name is not None and name in position]

    def key(r: RegionHealth) -> tuple:
        if r.name in pinned:
            return (0, pinned.index(r.name), 0.0)
        latency = r.latency_s if by_latency and r.latency_s is not None else float("inf")
        return (1, latency if by_latency else 0.0, position[r.name])

    ranked = sorted(regions, key=key)
    return [r.name for r in ranked if r.available(now)] + [r.name for r in ranked if not r.available(now)]
