"""Fixtures shared by the cluster tests."""

from __future__ import annotations

import pytest

from .frontdoor.harness import LoopThread


@pytest.fixture(scope="module")
def loop():
    """An event loop in its own thread, one per test module: servers run on it, tests call in blocking style."""
    lt = LoopThread()
    yield lt
    lt.close()
