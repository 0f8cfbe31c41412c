"""``levante bench-tracing``: what tracing costs a request, off and on, through a real front door.

One process: a grpc.aio front door on its own event loop thread, its region router and a
``LocalBackend`` over one engine (default: the tiny Mistral 4 MoE, whose own time is small, so any
overhead shows), and a gRPC client on the main loop. Rounds alternate tracing off and on (so drift
in a shared machine's load falls on both alike); each round sends ``--requests`` streams one after
another.

- off: the default; no provider, no spans, no trace context carried.
- on: the production setup: OTLP/gRPC exporter (batching) to a local receiver, sample ratio 1,
  every hop's spans (front door, region router, attempt, backend, engine stages: 8 per request).

It prints latency percentiles per mode and the on/off ratios, and the off path's own telemetry
work: the calls one request makes with tracing off, timed alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import timeit
from typing import Any

DEFAULT_MODEL = "tiny:mistral4?seed=0&vocab_size=32768"
DEFAULT_TOKENIZER = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"
OFF, ON = "off", "on"


def _say(msg: str) -> None:
    print(f"[bench-tracing] {msg}", file=sys.stderr, flush=True)


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-frontdoor", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def off_path_cost_ns(number: int = 200_000) -> float:
    """Nanoseconds of the telemetry calls one request makes with tracing and metrics off."""
    from cluster.telemetry import tracing
    from cluster.telemetry.spans import RouteTrace, route_trace
    from cluster.types import GenerateRequest
    from engine.types import SamplingParams

    assert not tracing.active()
    request = GenerateRequest("r", "m", "hi", SamplingParams())
    metrics = None

    def one_request() -> None:
        _ = metrics is not None or tracing.active()  # the front door: make a CallTelemetry?
        trace = route_trace(request)  # the region router
        _ = isinstance(trace, RouteTrace)
        trace.attempt("local", 0, request)
        tracing.active()  # LocalBackend: a span?

    return min(timeit.repeat(one_request, number=number, repeat=5)) / number * 1e9


def _load_engine(args):
    from engine.api import create_engine
    from engine.config import CacheConfig, EngineConfig, ModelConfig

    return create_engine(
        EngineConfig(
            model=ModelConfig(model=args.model, tokenizer=args.tokenizer or None, num_threads=args.threads),
            cache=CacheConfig(enable_prefix_caching=False),
        )
    )


Samples = dict[str, list[float]]  # seconds, per mode


async def _measure(args, port: int, on, progress) -> tuple[Samples, Samples]:
    """End-to-end latencies and TTFTs per mode through the front door on ``port``."""
    from cluster.ops.bench.paths import GrpcPath
    from cluster.telemetry import tracing

    latencies: Samples = {OFF: [], ON: []}
    ttfts: Samples = {OFF: [], ON: []}
    prompt = list(range(100, 100 + args.prompt_len))
    client = GrpcPath("levante", f"127.0.0.1:{port}", 120.0)
    await client.open()
    try:
        for i in range(args.warmup):
            await client.generate(f"warm-{i}", prompt, args.max_tokens)
        for r in range(args.rounds):
            for mode in (OFF, ON) if r % 2 == 0 else (ON, OFF):  # alternate who goes first
                if mode == ON:
                    tracing.setup_tracing(on, "bench", "frontdoor")
                for i in range(args.requests):
                    t = await client.generate(f"{mode}-{r}-{i}", prompt, args.max_tokens)
                    latencies[mode].append(t.done - t.sent)
                    ttfts[mode].append(t.ttft)
                if mode == ON:
                    tracing.shutdown()  # flushes the batch: its export is not billed to the next round
            progress(f"round {r + 1}/{args.rounds} done ({(r + 1) * args.requests} requests per mode)")
    finally:
        await client.close()
    return latencies, ttfts


def _summary(latencies: Samples, ttfts: Samples) -> dict[str, dict[str, float]]:
    from cluster.ops.bench.timing import percentile

    ms = 1000.0
    return {
        mode: {
            "requests": len(latencies[mode]),
            "e2e_p50_ms": percentile(latencies[mode], 50) * ms,
            "e2e_p90_ms": percentile(latencies[mode], 90) * ms,
            "e2e_mean_ms": statistics.fmean(latencies[mode]) * ms,
            "ttft_p50_ms": percentile(ttfts[mode], 50) * ms,
        }
        for mode in (OFF, ON)
    }


def run_benchmark(args, progress=_say) -> dict[str, Any]:
    from cluster.backends import LocalBackend
    from cluster.config import ClusterConfig, FrontDoorConfig, HttpConfig, TracingConfig
    from cluster.frontdoor import FrontDoor
    from cluster.ops.bench.otlp_sink import OtlpSink
    from cluster.regions.region_router import build_region_router
    from cluster.types import ModelInfo

    progress(f"loading {args.model}")
    engine = _load_engine(args)
    sink = OtlpSink()
    on = TracingConfig(enabled=True, otlp_endpoint=f"127.0.0.1:{sink.port}")
    cfg = ClusterConfig(
        region="bench", model_name="bench", frontdoor=FrontDoorConfig(port=0, http=HttpConfig(port=None))
    )
    server = _LoopThread()
    info = server.run(engine.info())
    router = build_region_router(cfg, LocalBackend(engine, ModelInfo("bench", info.max_model_len), "bench"))
    door = FrontDoor(cfg.frontdoor, router.backend, "bench", "bench")
    port = server.run(door.start())
    try:
        latencies, ttfts = asyncio.run(_measure(args, port, on, progress))
    finally:
        server.run(door.stop())
        server.run(router.stop())
        server.close()
        engine.shutdown()
        sink.stop()
    return {
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "modes": _summary(latencies, ttfts),
        "spans_exported": sink.spans,
        "off_path_ns": off_path_cost_ns(),
    }


def format_report(result: dict[str, Any]) -> str:
    o, m = result["options"], result["modes"]
    lines = [
        (
            f"model {o['model']}; {o['rounds']} rounds x {o['requests']} sequential requests per mode, "
            f"{o['max_tokens']} greedy tokens, prompts of {o['prompt_len']} tokens"
        ),
        f"{'tracing':<9}{'e2e p50':>9}{'e2e p90':>9}{'e2e mean':>10}{'TTFT p50':>10}",
    ]
    for mode in (OFF, ON):
        s = m[mode]
        lines.append(
            f"{mode:<9}{s['e2e_p50_ms']:>9.2f}{s['e2e_p90_ms']:>9.2f}{s['e2e_mean_ms']:>10.2f}{s['ttft_p50_ms']:>10.2f}"
        )
    ratio = {k: m[ON][k] / m[OFF][k] for k in ("e2e_p50_ms", "e2e_p90_ms", "e2e_mean_ms", "ttft_p50_ms")}
    lines.append(
        f"{'on/off':<9}{ratio['e2e_p50_ms']:>8.3f}x{ratio['e2e_p90_ms']:>8.3f}x"
        f"{ratio['e2e_mean_ms']:>9.3f}x{ratio['ttft_p50_ms']:>9.3f}x"
    )
    per_request = result["spans_exported"] / max(1, m[ON]["requests"])
    off_us = result["off_path_ns"] / 1000
    lines.append(f"spans exported with tracing on: {result['spans_exported']} ({per_request:.1f} per request)")
    lines.append(
        f"tracing off: the telemetry calls of one request take {off_us:.2f} us "
        f"({off_us / (m[OFF]['e2e_p50_ms'] * 1000):.4%} of the off p50)"
    )
    lines.append("(milliseconds; e2e from sending the call to its final message, at the client)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"engine model (default {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer ('' for the model's own)")
    p.add_argument("--requests", type=int, default=50, help="measured requests per mode and round")
    p.add_argument("--rounds", type=int, default=6, help="rounds; each runs both modes, alternating which first")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine")


def run(args) -> int:
    if min(args.requests, args.rounds, args.max_tokens, args.prompt_len) < 1 or args.warmup < 0:
        raise ValueError("--requests, --rounds, --max-tokens and --prompt-len must be >= 1, --warmup >= 0")
    print(format_report(run_benchmark(args)), flush=True)
    return 0
