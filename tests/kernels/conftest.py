"""Fixtures for the CPU kernels' choices: which CPU they believe they run on, and how often they call oneDNN."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from kernels.linear import cpu as cpu_linear


@pytest.fixture
def onednn_calls(monkeypatch) -> list[int]:
    """One entry per ``mkldnn._linear_pointwise`` call the test makes (the real op still runs)."""
    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture
def as_vendor(monkeypatch) -> Iterator[Callable[[str], None]]:
    """``as_vendor("AuthenticAMD")``: the CPU kernels choose as on that vendor's CPU until the test ends."""

    def pretend(vendor: str) -> None:
        monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
        cpu_linear.packed_from_rows.cache_clear()

    yield pretend
    cpu_linear.packed_from_rows.cache_clear()  # the real vendor's answer next time
