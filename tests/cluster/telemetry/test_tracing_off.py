"""Tracing off (the default): nothing is installed and nothing is carried, and requests work.

Run in a fresh interpreter: an OpenTelemetry provider, once set, stays for the life of a process,
and other test modules set one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

PROBE = textwrap.dedent("""
    import asyncio, json, sys
    import grpc
    from levante.v1 import inference_pb2 as pb
    from opentelemetry import trace

    from cluster.config import ClusterConfig, FrontDoorConfig
    from cluster.frontdoor import FrontDoor
    from cluster.regions.region_router import build_region_router
    from cluster.telemetry import tracing
    from cluster.telemetry.hookup import ServerTelemetry
    from tests.cluster.frontdoor.harness import GENERATE, MODEL, ScriptedBackend

    async def main():
        cfg = ClusterConfig(model_name=MODEL, frontdoor=FrontDoorConfig(port=0))  # telemetry: all defaults
        telemetry = ServerTelemetry(cfg)
        telemetry.start_tracing()
        backend = ScriptedBackend()
        router = build_region_router(cfg, backend)
        door = FrontDoor(cfg.frontdoor, router.backend, cfg.region, MODEL, metrics=telemetry.metrics)
        port = await door.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
            header = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
            responses = [r async for r in call(pb.GenerateRequest(prompt="hi").SerializeToString(),
                                               metadata=(("traceparent", header),), timeout=10)]
        await door.stop()
        await telemetry.stop()
        print(json.dumps({
            "kinds": [r.WhichOneof("kind") for r in responses],
            "provider": type(trace.get_tracer_provider()).__name__,
            "active": tracing.active(),
            "carried": [r.trace_context for r in backend.requests],
            "sdk_loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")),
            "metrics": telemetry.metrics is not None,
        }))

    asyncio.run(main())
""")


def test_tracing_off_installs_nothing_carries_nothing_and_serves():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{seen}")
    assert seen["kinds"] == ["start", "delta", "delta", "final"]  # the request works
    assert seen["provider"] == "ProxyTracerProvider"  # no TracerProvider: the OpenTelemetry API is its no-op
    assert seen["active"] is False
    assert seen["carried"] == [None]  # the caller's traceparent was not read, no carrier was made
    assert seen["sdk_loaded"] == []  # the SDK and the OTLP exporter were never even imported
    assert seen["metrics"] is False  # metrics are off by default too
