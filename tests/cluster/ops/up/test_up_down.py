"""`levante up` / `status` / `down` as a user runs them: two regions as separate process groups
(each its own Ray cluster), a call that fails over between them, and nothing left afterwards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]
BASE = {
    "model_name": "tiny-moe",
    "engine": {
        "model": {
            "model": "tiny:mistral4?seed=0&vocab_size=32768",
            "tokenizer": "mistral-common:mistral_instruct_tokenizer_240323.model.v3",
            "num_threads": 1,
        }
    },
    "ray": {"num_cpus": 2},
}


def levante(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_up_status_down(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "topo.yaml").write_text(
        yaml.safe_dump({"base": "base.yaml", "regions": [{"name": "eu", "port": 0}, {"name": "us", "port": 0}]})
    )
    state = str(tmp_path / "state")
    up = levante("up", "--config", str(tmp_path / "topo.yaml"), "--state-dir", state)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "eu: serving on 127.0.0.1:" in up.stdout and "us: serving on 127.0.0.1:" in up.stdout
        regions = {r["name"]: r for r in json.loads(Path(state, "regions.json").read_text())}
        assert regions["eu"]["pid"] != regions["us"]["pid"]

        status = levante("status", "--state-dir", state)
        assert status.returncode == 0 and status.stdout.count("SERVING") == 2, status.stdout

        again = levante("up", "--config", str(tmp_path / "topo.yaml"), "--state-dir", state)
        assert again.returncode == 2 and "still run" in again.stderr  # never two sets on one state dir

        # the client library, eu first: eu is frozen by hand, so the call goes to us by timeout
        eu, us = regions["eu"], regions["us"]
        for pid in _session(eu["pid"]):
            os.kill(pid, 19)  # SIGSTOP
        try:
            call = levante(
                "client",
                "generate",
                "--regions",
                f"eu=127.0.0.1:{eu['port']},us=127.0.0.1:{us['port']}",
                "--max-tokens",
                "4",
                "--raw",
                "hello",
                timeout=120,
            )
        finally:
            for pid in _session(eu["pid"]):
                os.kill(pid, 18)  # SIGCONT
        assert call.returncode == 0, call.stderr
        assert "served by us/" in call.stderr
        # the idle limit, or, sooner, the client's checks calling eu down: either way a timeout, not a refusal
        assert re.search(r"failed over from eu at token 0 \((unhealthy: )?timeout", call.stderr), call.stderr
    finally:
        down = levante("down", "--state-dir", state, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "eu: stopped" in down.stdout and "us: stopped" in down.stdout
    assert not any(alive(r["pid"]) for r in regions.values())
    assert not any(_session(r["pid"]) for r in regions.values())  # Ray's processes too
    assert not any(os.path.exists(r["temp_dir"]) for r in regions.values())
    missing = levante("down", "--state-dir", state)
    assert missing.returncode == 2 and "no regions were started" in missing.stderr


def _session(leader: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == leader and fields[0] != b"Z":
                out.append(int(entry))
    return out
