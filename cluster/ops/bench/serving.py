"""``levante bench-serving``: what the front door, router and Serve add over the engine in-process.

One process, one model, the same prompts on three paths:

1. in-process   -- ``engine.api.create_engine`` and its ``generate()`` iterator;
2. levante      -- a gRPC client -> our grpc.aio front door (which routes) -> EngineReplica (rank 0)
                   [-> rank actors 1..];
3. serve-proxy  -- a gRPC client -> Ray Serve's built-in gRPC proxy -> a thin ingress deployment (which
                   routes the same way) -> the same replicas (cluster/ops/bench/serve_grpc_ingress.py).

Requests run in rounds: each round sends the same ``concurrency`` prompts to
every path in turn (the order rotates), so drift in a shared machine's load
falls on all three alike. Prefix caching is off: Levante and the Serve proxy
share one engine, and the second to see a prompt would skip its prefill.
The front door runs on its own event loop thread, as it would in its own
server; the clients run on the main loop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_CONFIG = "configs/local.yaml"
IN_PROCESS, LEVANTE, SERVE_PROXY = "in-process", "levante", "serve-proxy"
PATHS = (IN_PROCESS, LEVANTE, SERVE_PROXY)
RATIOS = ((LEVANTE, IN_PROCESS), (SERVE_PROXY, IN_PROCESS), (SERVE_PROXY, LEVANTE))
METRICS = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tokens_per_s")

RAY_START_S = 120.0  # starting a local Ray cluster, on top of loading the model


@dataclass(frozen=True)
class BenchOptions:
    num_requests: int = 40  # measured requests per path and concurrency level
    max_tokens: int = 32
    prompt_len: int = 32
    concurrency: tuple[int, ...] = (1,)
    warmup: int = 3  # unmeasured requests per path before each level
    seed: int = 0
    request_timeout_s: float = 300.0


def _say(msg: str) -> None:
    print(f"[bench-serving] {msg}", file=sys.stderr, flush=True)


def bench_config(cfg):
    """The config every path runs: prefix caching off, the front door on a free port (no HTTP), and an
    explicit torch thread count (Ray gives an actor as many threads as it has CPUs; the
    in-process engine must not get more)."""
    from cluster.config import HttpConfig

    threads = cfg.engine.model.num_threads or max(1, int(cfg.replica.cpus_per_rank))
    engine = dataclasses.replace(
        cfg.engine,
        model=dataclasses.replace(cfg.engine.model, num_threads=threads),
        cache=dataclasses.replace(cfg.engine.cache, enable_prefix_caching=False),
    )
    return dataclasses.replace(
        cfg, engine=engine, frontdoor=dataclasses.replace(cfg.frontdoor, port=0, http=HttpConfig(port=None))
    )


class _LoopThread:
    """An event loop in its own thread, for the region's front door."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-frontdoor", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float) -> Any:
        """``coro``'s result; cancelled in the loop when the wait ends otherwise (Ctrl-C, timeout)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():  # still inside a blocking call: a daemon thread, left to exit with us
            self.loop.close()


def run_benchmark(cfg, opts: BenchOptions, progress: Callable[[str], None] = _say, proxy=None) -> dict[str, Any]:
    """Start everything, measure every path, stop everything; returns the results (see ``_level``).

    Interrupted (Ctrl-C) at any point, even while starting, it stops what it started before the
    KeyboardInterrupt goes on: the engines, the Serve apps and the region (its Ray cluster too).
    ``proxy``: how Serve's gRPC proxy starts (a ``serve_proxy.ServeGrpcProxy``; default: a new one).
    """
    from cluster.ops.bench.paths import InProcessPath
    from cluster.ops.bench.serve_proxy import ServeGrpcProxy
    from cluster.region import RegionServer

    cfg = bench_config(cfg)
    loop_thread = _LoopThread()
    proxy = proxy or ServeGrpcProxy(progress=progress)
    region = RegionServer(cfg, progress=progress, start_serve=proxy.start)
    in_process = InProcessPath(cfg, opts.request_timeout_s)
    ingress: list[str] = []  # the ingress app, once deployed
    try:
        port = loop_thread.run(region.start(), timeout=cfg.replica.load_timeout_s + RAY_START_S)
        paths = _start_paths(cfg, opts, port, proxy.port, in_process, ingress, progress)
        levels = asyncio.run(_measure(paths, opts, progress))
    finally:
        _stop(cfg, loop_thread, region, in_process, ingress, progress)
    return {"config": _described(cfg), "options": dataclasses.asdict(opts), "levels": levels}


def _start_paths(cfg, opts: BenchOptions, port: int, grpc_port, in_process, ingress: list, progress) -> dict:
    """Deploy the Serve proxy's ingress app and load the in-process engine: the three paths."""
    from ray import serve

    from cluster.config_loader import config_to_dict
    from cluster.ops.bench.paths import GrpcPath
    from cluster.ops.bench.serve_grpc_ingress import build_ingress_app, ingress_app_name
    from cluster.serve.app import app_name

    name = ingress_app_name(app_name(cfg))
    progress(f"deploying the Serve gRPC proxy's ingress {name!r} (proxy on 127.0.0.1:{grpc_port})")
    ingress.append(name)  # before serve.run: an interrupted deploy is deleted too
    serve.run(build_ingress_app(app_name(cfg), config_to_dict(cfg)), name=name, route_prefix=f"/{name}")
    progress(
        f"loading the in-process engine (ep_size {cfg.replica.ep_size}, "
        f"{cfg.engine.model.num_threads} torch thread(s) per rank)"
    )
    in_process.start()
    return {
        IN_PROCESS: in_process,
        LEVANTE: GrpcPath(LEVANTE, f"{cfg.frontdoor.host}:{port}", opts.request_timeout_s),
        SERVE_PROXY: GrpcPath(
            SERVE_PROXY, f"127.0.0.1:{grpc_port}", opts.request_timeout_s, metadata=(("application", name),)
        ),
    }


def _stop(cfg, loop_thread: _LoopThread, region, in_process, ingress: list, progress) -> None:
    """Stop, in order, whatever was started; RegionServer.stop ends the Ray cluster (by PID, if Ray lost it)."""
    from ray import serve

    in_process.stop()
    for name in ingress:
        if region.ray_lost():
            break  # a signal to the process group ended Ray too: nothing to ask it
        try:
            serve.delete(name)
        except Exception as e:  # noqa: BLE001 -- stopping anyway; ray.shutdown ends it too
            progress(f"could not delete {name!r}: {e!r}")
    try:
        loop_thread.run(region.stop(), timeout=cfg.frontdoor.drain_timeout_s + 120)
    finally:
        loop_thread.close()


def _described(cfg) -> dict[str, Any]:
    return {
        "region": cfg.region,
        "model_name": cfg.model_name,
        "model": cfg.engine.model.model,
        "ep_size": cfg.replica.ep_size,
        "torch_threads_per_rank": cfg.engine.model.num_threads,
        "stream_chunk_tokens": cfg.replica.stream_chunk_tokens,
        "stream_chunk_ms": cfg.replica.stream_chunk_ms,
    }


async def _measure(paths: dict[str, Any], opts: BenchOptions, progress: Callable[[str], None]) -> list[dict]:
    for p in paths.values():
        if hasattr(p, "open"):
            await p.open()
    try:
        vocab = await paths[IN_PROCESS].vocab_size()
        rng = random.Random(opts.seed)
        prompts = [[rng.randrange(100, vocab) for _ in range(opts.prompt_len)] for _ in range(opts.num_requests)]
        return [await _level(paths, prompts, c, opts, progress) for c in opts.concurrency]
    finally:
        for p in paths.values():
            if hasattr(p, "close"):
                await p.close()


async def _level(
    paths: dict[str, Any],
    prompts: list[list[int]],
    concurrency: int,
    opts: BenchOptions,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from cluster.ops.bench.timing import summarize

    tag = f"c{concurrency}-{time.time_ns()}"  # request ids unique across levels and runs
    for name, path in paths.items():
        await _warm_up(path, prompts[0], concurrency, opts, f"{tag}-warm-{name}", progress)
    timings: dict[str, list] = {name: [] for name in PATHS}
    wall = {name: 0.0 for name in PATHS}
    rounds = math.ceil(len(prompts) / concurrency)
    last_report = time.monotonic()
    for r in range(rounds):
        batch = prompts[r * concurrency : (r + 1) * concurrency]
        order = PATHS[r % 3 :] + PATHS[: r % 3]  # rotate, so no path always runs right after another
        for name in order:
            began = time.perf_counter()
            got = await asyncio.gather(
                *(paths[name].generate(f"{tag}-{name}-{r}-{i}", p, opts.max_tokens) for i, p in enumerate(batch))
            )
            wall[name] += time.perf_counter() - began
            timings[name].extend(got)
        done = min(len(prompts), (r + 1) * concurrency)
        if time.monotonic() - last_report > 2.0 or r == rounds - 1:
            last_report = time.monotonic()
            progress(f"concurrency {concurrency}: {done}/{len(prompts)} requests done on each of {', '.join(PATHS)}")
    stats = {name: summarize(timings[name], wall[name]) for name in PATHS}
    reference = [t.token_ids for t in timings[IN_PROCESS]]
    return {
        "concurrency": concurrency,
        "paths": {name: dataclasses.asdict(s) for name, s in stats.items()},
        "ratios": {
            f"{a}/{b}": {m: _ratio(getattr(stats[a], m), getattr(stats[b], m)) for m in METRICS} for a, b in RATIOS
        },
        # Greedy decoding of the same prompts on the same weights: every path must produce the same tokens.
        "same_tokens_as_in_process": {
            name: sum(t.token_ids == ref for t, ref in zip(timings[name], reference)) / max(1, len(reference))
            for name in PATHS
        },
        "token_ids": {name: [t.token_ids for t in timings[name]] for name in PATHS},
    }


async def _warm_up(
    path,
    prompt: list[int],
    concurrency: int,
    opts: BenchOptions,
    tag: str,
    progress: Callable[[str], None],
    ready_within_s: float = 60.0,
) -> None:
    """A few unmeasured requests; Serve's proxy learns of a new app's route a moment after it
    is deployed, so the first call is retried until then."""
    import grpc

    began = time.monotonic()
    while True:
        try:
            await path.generate(f"{tag}-probe", prompt, 2)
            break
        except grpc.aio.AioRpcError as e:
            if time.monotonic() - began > ready_within_s:
                raise RuntimeError(
                    f"{path.name}: not answering after {ready_within_s:g}s: {e.code().name}: {e.details()}"
                ) from None
            await asyncio.sleep(0.5)
    for i in range(opts.warmup):
        await asyncio.gather(*(path.generate(f"{tag}-{i}-{j}", prompt, opts.max_tokens) for j in range(concurrency)))
    progress(f"{path.name}: warmed up")


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


# ---- report ----------------------------------------------------------------------------------------


def format_report(result: dict[str, Any]) -> str:
    c, o = result["config"], result["options"]
    header = (
        f"model {c['model'] or 'embedded SmolLM2-135M-Instruct'} ({c['model_name']}), ep_size {c['ep_size']}, "
        f"{c['torch_threads_per_rank']} torch thread(s) per rank; {o['num_requests']} requests x "
        f"{o['max_tokens']} greedy tokens, prompts of {o['prompt_len']} tokens"
    )
    columns = (
        f"{'path':<13}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
        f"{'gap p50':>9}{'gap p99':>9}{'tok/chunk':>10}{'tok/s':>8}{'same tokens':>13}"
    )
    lines = [header]
    for level in result["levels"]:
        lines += ["", f"concurrency {level['concurrency']}", columns]
        for name, s in level["paths"].items():
            lines.append(
                f"{name:<13}{s['ttft_p50_ms']:>10.1f}{s['ttft_p99_ms']:>10.1f}{s['itl_p50_ms']:>9.2f}"
                f"{s['itl_p99_ms']:>9.2f}{s['chunk_gap_p50_ms']:>9.1f}{s['chunk_gap_p99_ms']:>9.1f}"
                f"{s['tokens_per_chunk']:>10.1f}{s['tokens_per_s']:>8.1f}"
                f"{level['same_tokens_as_in_process'][name]:>13.0%}"
            )
        lines.append(f"{'ratio':<27}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'tok/s':>8}")
        for key, r in level["ratios"].items():
            lines.append(f"{key:<27}" + "".join(f"{r[m]:>{w}.2f}x" for m, w in zip(METRICS, (9, 9, 8, 8, 7))))
        lines.append(_overheads(level["paths"]))
    lines.append("(milliseconds; ITL = chunk gap / tokens in the chunk, per token; gap = per chunk)")
    return "\n".join(lines)


def _overheads(paths: dict[str, dict]) -> str:
    """TTFT p50 over in-process's, per serving path, and how levante's compares with the Serve proxy's."""
    base = paths[IN_PROCESS]["ttft_p50_ms"]
    ours, theirs = (paths[p]["ttft_p50_ms"] - base for p in (LEVANTE, SERVE_PROXY))
    return (
        f"TTFT p50 overhead over in-process: levante {ours:.1f} ms, serve-proxy {theirs:.1f} ms "
        f"(levante/serve-proxy {_ratio(ours, theirs):.2f})"
    )


# ---- command line ----------------------------------------------------------------------------------


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return levels


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"cluster YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--requests", type=int, default=BenchOptions.num_requests, help="measured requests per path")
    p.add_argument("--max-tokens", type=int, default=BenchOptions.max_tokens)
    p.add_argument("--prompt-len", type=int, default=BenchOptions.prompt_len)
    p.add_argument(
        "--concurrency",
        type=_levels,
        default=BenchOptions.concurrency,
        help="comma-separated levels, e.g. 1,4 (default 1: sequential requests)",
    )
    p.add_argument("--warmup", type=int, default=BenchOptions.warmup, help="unmeasured requests per path")
    p.add_argument("--seed", type=int, default=BenchOptions.seed)
    p.add_argument("--json", default=None, help="also write the results (with every token id) to this file")


def run(args) -> int:
    from cluster.config_loader import load_config

    if args.requests < 1 or args.max_tokens < 2 or args.prompt_len < 1 or args.warmup < 0:
        raise ValueError("--requests and --prompt-len must be >= 1, --max-tokens >= 2, --warmup >= 0")
    opts = BenchOptions(
        num_requests=args.requests,
        max_tokens=args.max_tokens,
        prompt_len=args.prompt_len,
        concurrency=args.concurrency,
        warmup=args.warmup,
        seed=args.seed,
    )
    try:
        result = run_benchmark(load_config(args.config), opts)
    except KeyboardInterrupt:
        _say("interrupted: what the benchmark started is stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        # Ray's exit hooks would wait on a GCS the interrupt may have ended, and a start-up call
        # may still block a worker thread: everything of ours is stopped, so leave without them.
        os._exit(130)
    result["config"]["file"] = args.config
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
