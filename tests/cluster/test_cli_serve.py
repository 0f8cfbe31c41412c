"""`levante serve` as a user runs it: a separate process, a YAML file, SIGTERM to stop.

Checks the drain end to end: on SIGTERM health turns NOT_SERVING, new calls
get UNAVAILABLE, the stream already running finishes, and the process exits 0
having stopped its Ray cluster.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from levante.v1 import inference_pb2 as pb
from levante.v1 import inference_pb2_grpc as pb_grpc

from .frontdoor.harness import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

CONFIG = {
    "region": "cli",
    "model_name": "tiny-moe",
    "engine": {
        "model": {
            "model": "tiny:mistral4?seed=0&vocab_size=32768",
            "tokenizer": "mistral-common:mistral_instruct_tokenizer_240323.model.v3",
            "num_threads": 1,
        }
    },
    "replica": {"ep_size": 2},
    "frontdoor": {"port": 0, "drain_timeout_s": 60, "http": {"port": 0}},
    "ray": {"num_cpus": 4},
}


@pytest.fixture
def server(tmp_path):
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: any("serving" in line for line in lines) or proc.poll() is not None,
            timeout=300,
            what="levante serve to come up",
        )
        up = next((line for line in lines if " serving " in line), None)
        assert up is not None, "".join(lines)
        port = int(re.search(r":(\d+) \(", up).group(1))
        yield proc, port, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)


def _http_url(lines: list[str]) -> str:
    """The HTTP API's address, as `levante serve` prints it."""
    wait_until(lambda: any("OpenAI-compatible HTTP API at" in line for line in lines), timeout=30, what="the HTTP line")
    line = next(line for line in lines if "OpenAI-compatible HTTP API at" in line)
    return re.search(r"at (http://\S+)/v1 ", line).group(1)


def _health(ch) -> int:
    return (
        health_pb2_grpc.HealthStub(ch)
        .Check(health_pb2.HealthCheckRequest(service="levante.v1.Inference"), timeout=5)
        .status
    )


def test_sigterm_drains_then_exits_cleanly(server):
    proc, port, lines = server
    http = _http_url(lines)
    answer = openai.OpenAI(base_url=f"{http}/v1", api_key="none", max_retries=0).completions.create(
        model="tiny-moe", prompt="Hello", max_tokens=2
    )
    assert answer.usage.completion_tokens == 2
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.InferenceStub(ch)
        long = stub.Generate(
            pb.GenerateRequest(prompt="Count with me", max_tokens=300, ignore_eos=True, temperature=0.0), timeout=300
        )
        first = next(long)  # the stream is running
        assert first.WhichOneof("kind") in ("start", "delta")

        proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: _health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING,
            timeout=20,
            what="NOT_SERVING after SIGTERM",
        )
        assert httpx.get(f"{http}/health").status_code == 503  # the HTTP API drains with the door
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(prompt="hello", max_tokens=2), timeout=20))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        rest = list(long)  # the running stream is allowed to finish
        assert rest[-1].WhichOneof("kind") == "final"
        assert rest[-1].final.usage.completion_tokens == 300

    assert proc.wait(120) == 0, "".join(lines)
    assert any("stopped" in line for line in lines)
    temp_dir = next(re.search(r"temp dir (\S+)\)", line).group(1) for line in lines if "temp dir" in line)
    assert not os.path.exists(temp_dir)  # its Ray cluster was stopped and cleaned up
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", temp_dir], capture_output=True).returncode == 1  # no Ray process left


def test_make_serve_default_answers_paris_through_the_front_door():
    """What `make serve` runs, on the embedded SmolLM2 model, stopping after its one question."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            "--config",
            "configs/local.yaml",
            "--port",
            "0",
            "--http-port",
            "0",
            "--check",
            "What is the capital of France?",
            "--exit-after-check",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Paris" in out.stdout, out.stdout
    assert "served by local/" in out.stderr and "effort none" in out.stderr, out.stderr
    # the check's client runs on the server's own loop: no grpc poller posting to a closed one
    assert "Event loop is closed" not in out.stderr, out.stderr
