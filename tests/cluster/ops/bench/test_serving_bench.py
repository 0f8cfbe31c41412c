"""Smoke test of ``levante bench-serving``: three paths, tiny numbers, a complete and sane result.

No timing assertions (the machine is shared); the real check is that greedy
decoding of the same prompts gives the same tokens on every path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

from cluster.config_loader import config_from_dict
from cluster.ops.bench.serve_proxy import ServeGrpcProxy
from cluster.ops.bench.serving import (
    METRICS,
    PATHS,
    BenchOptions,
    format_report,
    run_benchmark,
)
from cluster.ops.ports import reserve_port
from cluster.region import _pids_naming

from ...frontdoor.harness import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[4]
STOP_BOUND_S = 50  # below the 60 s Ray waits for a lost GCS: stopping must not wait for it

CONFIG = {
    "region": "bench-test",
    "model_name": "tiny-moe",
    "engine": {
        "model": {
            "model": "tiny:mistral4?seed=0&vocab_size=32768",
            "tokenizer": "mistral-common:mistral_instruct_tokenizer_240323.model.v3",
            "num_threads": 1,
            "max_model_len": 512,
        },
        "cache": {"num_blocks": 64},
    },
    "replica": {"num_replicas": 1, "ep_size": 1, "rank_timeout_s": 30},
    "frontdoor": {"port": 0, "http": {"port": 0}},
    "ray": {"num_cpus": 4},
}
OPTIONS = BenchOptions(num_requests=3, max_tokens=4, prompt_len=8, warmup=1, request_timeout_s=60)


def test_three_paths_give_the_same_greedy_tokens_and_every_figure():
    """Also: Serve's gRPC proxy, which cannot bind port 0, is started again on a fresh port when it
    cannot bind the one it was given (here taken by a listener of ours, as another process could)."""
    temp_dir = tempfile.mkdtemp(prefix="lvb-", dir="/tmp")  # ours, to check that its raylet is gone after
    cfg = config_from_dict(CONFIG, "test")
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, temp_dir=temp_dir))
    lines: list[str] = []

    def progress(message: str) -> None:
        print(f"[bench] {message}")
        lines.append(message)

    taken = socket.socket(socket.AF_INET6)  # listening: no reservation or server can bind its port
    taken.bind(("::", 0))
    taken.listen()
    blocked = taken.getsockname()[1]
    first = iter([taken])  # handed to the proxy as its first port's "reservation"
    proxy = ServeGrpcProxy(reserve=lambda: next(first, None) or reserve_port(), progress=progress)
    try:
        result = run_benchmark(cfg, OPTIONS, progress=progress, proxy=proxy)
        raylets = subprocess.run(["pgrep", "-af", "raylet"], check=False, capture_output=True, text=True).stdout
        assert temp_dir not in raylets, "the benchmark left its Ray cluster running"
    finally:
        taken.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(format_report(result))
    assert any(m.startswith(f"Serve's gRPC proxy did not start on port {blocked} ") for m in lines), lines
    assert proxy.port not in (None, blocked)

    (level,) = result["levels"]
    assert level["concurrency"] == 1
    reference = level["token_ids"]["in-process"]
    assert len(reference) == 3 and all(len(t) == 4 for t in reference)
    for name in PATHS:
        assert level["token_ids"][name] == reference, name
        assert level["same_tokens_as_in_process"][name] == 1.0
        s = level["paths"][name]
        assert s["requests"] == 3 and s["tokens"] == 12
        for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tokens_per_s"):
            assert math.isfinite(s[key]) and s[key] > 0, (name, key, s[key])
        assert s["ttft_p50_ms"] <= s["ttft_p99_ms"] and s["itl_p50_ms"] <= s["itl_p99_ms"]
    assert set(level["ratios"]) == {"levante/in-process", "serve-proxy/in-process", "serve-proxy/levante"}
    for ratios in level["ratios"].values():
        assert all(math.isfinite(ratios[m]) and ratios[m] > 0 for m in METRICS)


def test_ctrl_c_while_starting_stops_what_it_started_and_exits(tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole process group (Ray's processes too) while the
    region deploys. The benchmark stops what it started (by PID where Ray is gone) and exits 130."""
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    # As from a terminal: a suite started in the background by a shell without job control ignores
    # SIGINT, and a child inherits that; Python then sets no KeyboardInterrupt handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "cluster.cli", "bench-serving", "--config", str(path), "--requests", "1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    temp_dir = None
    try:
        wait_until(
            lambda: any("deploying" in line for line in lines) or proc.poll() is not None,
            timeout=300,
            what="bench-serving to start deploying",
        )
        assert proc.poll() is None, "".join(lines)
        temp_dir = next(re.search(r"temp dir (\S+)\)", line).group(1) for line in lines if "temp dir" in line)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"bench-serving still running {STOP_BOUND_S}s after Ctrl-C:\n" + "".join(lines))
        assert proc.returncode == 130, "".join(lines)
        # a start-up call left running would start a fresh Ray cluster once ours is gone (Ray's auto-init)
        assert not any("Started a local Ray instance" in line for line in lines), "".join(lines)
        wait_until(lambda: any("interrupted" in line for line in lines), timeout=10, what="the last lines")
        assert not os.path.exists(temp_dir), f"{temp_dir} left behind"
        wait_until(lambda: not _pids_naming(temp_dir), timeout=10, what="its Ray cluster's processes to be gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # by its group id: this test's own session
            proc.wait(30)
        if temp_dir:  # only after a failure: do not leave them to the next run
            for pid in _pids_naming(temp_dir):
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)
