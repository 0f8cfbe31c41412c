"""``levante``: the engine's commands plus ``serve`` and ``client``.

``levante serve --config configs/local.yaml`` runs one region until SIGTERM
or Ctrl-C, then drains. ``levante client ...`` talks to any front door.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

import engine.cli
from cluster import client_cli
from cluster.ops.drill import drill_cli
from cluster.ops.up import up_cli
from cluster.ops.up.processes import RegionsError
from cluster.types import DeployError

DEFAULT_CONFIG = "configs/local.yaml"


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run one region: Ray, the Serve app and the gRPC front door")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"cluster YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--port", type=int, default=None, help="front door port (overrides the config)")
    p.add_argument(
        "--http-port",
        type=_http_port,
        default=None,
        help="the OpenAI-compatible HTTP API's port, 0: any free one, off: no HTTP (overrides frontdoor.http.port)",
    )
    p.add_argument("--region", default=None, help="this region's name (overrides the config's region)")
    p.add_argument(
        "--check",
        metavar="PROMPT",
        default=None,
        help="smoke test (`make serve` uses it): once up, send PROMPT as one chat message (greedy, "
        "at most 64 tokens, as the first tenant when tenants are set) through this region's own "
        "front door, print the answer and its usage line, then keep serving; skipped when the "
        "front door uses TLS",
    )
    p.add_argument(
        "--exit-after-check",
        action="store_true",
        help="with --check: drain and stop after the answer (exit 0); a failed check stops "
        "the region with exit code 2 either way",
    )
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import dataclasses

    from cluster.config_loader import load_config
    from cluster.preflight import preflight

    cfg = load_config(args.config)
    if args.port is not None:
        cfg = dataclasses.replace(cfg, frontdoor=dataclasses.replace(cfg.frontdoor, port=args.port))
    if args.http_port is not None:
        port = None if args.http_port == "off" else args.http_port
        http = dataclasses.replace(cfg.frontdoor.http, port=port)
        cfg = dataclasses.replace(cfg, frontdoor=dataclasses.replace(cfg.frontdoor, http=http))
    if args.region is not None:
        cfg = dataclasses.replace(cfg, region=args.region)  # re-checked: it must not be one of its peers
    preflight(cfg, args.config)  # before Ray is even imported: a bad file, variable or port fails in a second
    return asyncio.run(_serve(cfg, args.config, args.check, args.exit_after_check))


def _http_port(value: str) -> int | str:
    return value if value == "off" else int(value)


async def _serve(cfg, source: str, check: str | None, exit_after_check: bool) -> int:
    from cluster.region import RegionServer

    server = RegionServer(cfg, source=source)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    on_signals()
    try:
        port = await server.start()
        on_signals()  # again: Ray's core worker installs its own SIGTERM handler (a crash dump) in ray.init
        target = f"{cfg.frontdoor.host}:{port}"
        if check is not None:
            code = await client_cli.check_answer(target, check, cfg)
            if exit_after_check:
                return code
        print(
            f'levante: try `levante client generate --target {target} "What is the capital of France?"`; '
            f"Ctrl-C or SIGTERM drains and stops",
            flush=True,
        )
        http = server.frontdoor.http if server.frontdoor is not None else None
        if http is not None:
            print(
                f"levante: OpenAI-compatible HTTP API at {http.url}/v1 (POST {http.url}/v1/chat/completions)",
                flush=True,
            )
        await stop.wait()
        return 0
    finally:
        await server.stop()
        if server.ray_lost():
            # Ray's exit hooks in this process would wait on the dead GCS and recreate the session
            # dir stop just removed; everything of ours is stopped, so leave without them.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0 if stop.is_set() else 1)


def _add_bench_serving(sub) -> None:
    from cluster.ops.bench import serving  # light: Ray, grpc and torch load only when the command runs

    p = sub.add_parser(
        "bench-serving",
        help="front door + router + Serve vs the engine in-process vs "
        "Ray Serve's gRPC proxy: TTFT, inter-token latency, ratios",
    )
    serving.add_arguments(p)
    p.set_defaults(func=serving.run)


def _add_bench_long_doc(sub) -> None:
    from cluster.ops.bench import long_document  # light: Ray and grpc load only when the command runs

    p = sub.add_parser(
        "bench-long-doc",
        help="a long document asked twice through a region with two replicas: both times to first token",
    )
    long_document.add_arguments(p)
    p.set_defaults(func=long_document.run)


def _add_bench_tracing(sub) -> None:
    from cluster.ops.bench import tracing_bench  # light: the engine and grpc load only when the command runs

    p = sub.add_parser("bench-tracing", help="what tracing costs a request through the front door: off vs on")
    tracing_bench.add_arguments(p)
    p.set_defaults(func=tracing_bench.run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="levante", description="Levante: serve Mistral-family MoE models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    engine.cli.add_commands(sub)
    _add_serve(sub)
    client_cli.add_commands(sub)
    up_cli.add_commands(sub)
    drill_cli.add_commands(sub)
    _add_bench_serving(sub)
    _add_bench_long_doc(sub)
    _add_bench_tracing(sub)
    return engine.cli.run(parser.parse_args(argv), errors=(*client_cli.ERRORS, DeployError, RegionsError))


if __name__ == "__main__":
    sys.exit(main())
