"""`make test-under-load`: the suite beside a busy loop on one core, the loop killed by its PID after."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has stopped already
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_under_load_runs_beside_a_busy_loop_and_kills_it_even_when_the_run_fails():
    # in place of `make test`: a run that sees the loop spinning (state R, within 10 s), then fails
    probe = "sh -c 'for i in $$(seq 100); do grep -q \") R \" /proc/$$BUSY_PID/stat && exit 3; sleep 0.1; done; exit 1'"
    result = subprocess.run(
        ["make", "-s", "test-under-load", f"UNDER_LOAD={probe}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"one core kept busy by pid (\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert result.returncode != 0 and "Error 3" in result.stderr, result.stderr  # the run's failure, passed on
    pid = int(found.group(1))
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(pid), f"the busy loop (pid {pid}) outlived the run"
