"""SIGTERM to `levante serve`'s whole process group, as systemd's KillMode=control-group sends it.

Ray's GCS and raylet share the group and exit at once; serve must notice,
skip what needs Ray, kill what is left of its cluster and remove its temp dir,
rather than wait 60 s for a GCS that is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from .frontdoor.harness import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = {
    "region": "group",
    "model_name": "tiny",
    "engine": {"model": {"model": "tiny:mistral?seed=0", "num_threads": 1}},
    "frontdoor": {"port": 0, "http": {"port": 0}},
    "ray": {"num_cpus": 2},
}
# Below the 60 s Ray waits for a lost GCS: the point is that stop does not wait for it.
STOP_BOUND_S = 50


def test_sigterm_to_the_process_group_stops_promptly(tmp_path):
    path = tmp_path / "group.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "cluster.cli", "serve", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    temp_dir = None
    try:
        wait_until(
            lambda: any(" serving " in line for line in lines) or proc.poll() is not None,
            timeout=300,
            what="levante serve to come up",
        )
        assert proc.poll() is None, "".join(lines)
        temp_dir = next(re.search(r"temp dir (\S+)\)", line).group(1) for line in lines if "temp dir" in line)
        os.killpg(proc.pid, signal.SIGTERM)  # the group: levante, Ray's GCS and raylet alike
        try:
            proc.wait(STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"levante serve still running {STOP_BOUND_S}s after SIGTERM to its group:\n" + "".join(lines))
        assert proc.returncode == 0, "".join(lines)
        wait_until(lambda: any("levante: stopped" in line for line in lines), timeout=10, what="the last lines")
        assert not os.path.exists(temp_dir), f"{temp_dir} left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # by its group id: this test's own session
            proc.wait(30)
        if temp_dir and os.path.isdir(temp_dir):  # only after a failure: do not leave it to the next run
            shutil.rmtree(temp_dir, ignore_errors=True)
