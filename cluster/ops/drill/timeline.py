"""The drill's timeline PNG: throughput and latency by region over time, with the faults marked.

Top panel: requests per second by region, bucketed by finish time (1 s
buckets), failed requests as their own series. Bottom panel: end-to-end
latency of each request by send time. Every fault is shaded from injection to
restore on both panels, or marked with an arrow when never restored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.ops.drill.records import FaultRecord, RequestRecord

FAILED_COLOR = "tab:red"
# tab10 without its red, so no region is drawn in the colour of failures.
_REGION_COLORS = [
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
]
# Faults in neutral greys, so a shaded outage is never mistaken for a region's colour.
FAULT_COLOR = "0.55"
_LABEL_ROWS = 4  # fault labels are staggered over this many rows so close faults stay readable


def write_png(
    scenario_name: str,
    requests: Sequence[RequestRecord],
    faults: Sequence[FaultRecord],
    path: str | Path,
    *,
    dpi: int = 110,
) -> Path:
    """Draw the timeline to ``path`` (PNG) and return it; works headless, touches no pyplot state."""
    # Imported here: the report itself needs no matplotlib, and importing it costs a few hundred ms.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig: render with Agg whatever the default backend is
    top, bottom = fig.subplots(2, 1, sharex=True)
    colors = _region_colors(requests)
    _plot_rate(top, requests, colors)
    _plot_latency(bottom, requests, colors)
    for i, fault in enumerate(faults):
        _mark_fault(top, bottom, fault, i)

    top.set_xlim(0, _end_time(requests, faults))
    top.set_ylim(bottom=0)
    bottom.set_ylim(bottom=0)
    top.set_ylabel("requests/s (by finish time)")
    bottom.set_ylabel("end-to-end latency (s)")
    bottom.set_xlabel("seconds since drill start (latency plotted at send time)")
    for ax in (top, bottom):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize="small")
    fig.suptitle(scenario_name)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def _region_colors(requests: Sequence[RequestRecord]) -> dict[str, str]:
    names = sorted({r.region for r in requests if r.region})
    return {name: _REGION_COLORS[i % len(_REGION_COLORS)] for i, name in enumerate(names)}


def _end_time(requests: Sequence[RequestRecord], faults: Sequence[FaultRecord]) -> float:
    times = [r.ended for r in requests]
    times += [t for f in faults for t in (f.at, f.restored_at) if t is not None]
    return max(times, default=0.0) + 1.0


def _per_second(times: Sequence[float], n_buckets: int) -> list[int]:
    counts = [0] * n_buckets
    for t in times:
        counts[min(max(math.floor(t), 0), n_buckets - 1)] += 1
    return counts


def _plot_rate(ax: Any, requests: Sequence[RequestRecord], colors: dict[str, str]) -> None:
    if not requests:
        return
    n = math.floor(max(r.ended for r in requests)) + 1
    # Every bucket is drawn, zeros included: a region's line dropping to 0 is the outage.
    centres = [i + 0.5 for i in range(n)]
    for region, color in colors.items():
        ended = [r.ended for r in requests if r.ok and r.region == region]
        ax.plot(centres, _per_second(ended, n), drawstyle="steps-mid", color=color, label=region)
    failed = [r.ended for r in requests if not r.ok]
    if failed:
        ax.plot(centres, _per_second(failed, n), drawstyle="steps-mid", color=FAILED_COLOR, label="failed")


def _plot_latency(ax: Any, requests: Sequence[RequestRecord], colors: dict[str, str]) -> None:
    for region, color in colors.items():
        done = [r for r in requests if r.ok and r.region == region]
        ax.scatter([r.sent for r in done], [r.latency for r in done], s=8, color=color, label=region)
    failed = [r for r in requests if not r.ok]
    if failed:
        ax.scatter(
            [r.sent for r in failed],
            [r.latency for r in failed],
            s=18,
            marker="x",
            color=FAILED_COLOR,
            label="failed (time to failure)",
        )


def _mark_fault(top: Any, bottom: Any, fault: FaultRecord, index: int) -> None:
    label_y = 0.95 - 0.08 * (index % _LABEL_ROWS)
    if fault.restored_at is not None:
        for ax in (top, bottom):
            ax.axvspan(fault.at, fault.restored_at, color=FAULT_COLOR, alpha=0.2, linewidth=0)
        top.text(
            fault.at,
            label_y,
            f" {fault.name}",
            transform=top.get_xaxis_transform(),
            va="top",
            ha="left",
            fontsize="small",
            color="black",
        )
        return
    # Never restored: no end to shade to, so an arrow points at the injection time.
    top.annotate(
        f"{fault.name} (not restored)",
        xy=(fault.at, 0.0),
        xytext=(fault.at, label_y),
        xycoords=top.get_xaxis_transform(),
        textcoords=top.get_xaxis_transform(),
        va="top",
        ha="left",
        fontsize="small",
        # relpos: start at the text's lower-left corner, which sits at x = at, so the arrow is vertical
        arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 1.2, "relpos": (0.0, 0.0)},
    )
    bottom.axvline(fault.at, color="black", linestyle="--", linewidth=1.0)
