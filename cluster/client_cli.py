"""``levante client``: call a front door over gRPC (generate, models, health).

Streams the answer as it comes, with the reasoning shown apart (dimmed on a
terminal, after ``[thinking]``) from the answer (after ``[answer]``), then
one summary line on stderr: finish reason, usage, the effort the router chose
and why, which region and replica served it, and any failover on the way.
``generate`` goes through the client library (``cluster.regions.region_client``), so
with ``--regions`` it fails over between front doors and resumes a broken
stream in the next one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.regions.region_client import RegionClient, collect, parse_endpoint
from cluster.types import GRPC_NAMES, REQUEST_EFFORTS, Chunk, PrefillProgress
from levante.v1 import inference_pb2 as pb
from levante.v1 import inference_pb2_grpc as pb_grpc


class ClientError(Exception):
    """A call that failed, as one line: the gRPC status and its details."""


ERRORS = (ClientError,)


def format_error(code: str, details: str, origin: str | None = None) -> str:
    """The one way the client commands word a failed call: the code once, who answered, what it said."""
    where = f" from {origin}" if origin else ""
    return f"{code}{where}: {details or '(no details)'}"


def open_channel(target: str, ca: str | None = None, cert: str | None = None, key: str | None = None) -> grpc.Channel:
    if ca is None and cert is None:
        return grpc.insecure_channel(target)
    read = lambda p: Path(p).read_bytes() if p else None
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))


def _metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def _fail(e: grpc.RpcError, details: str = "") -> ClientError:
    """``details``: what to say when the server said nothing (grpc.health answers NOT_FOUND bare)."""
    return ClientError(format_error(e.code().name, e.details() or details))


class StreamPrinter:
    """Reasoning (dimmed on a terminal, after ``[thinking]``) apart from the answer (after ``[answer]``)."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout  # looked up now, not at import: a redirected stdout is honoured
        self.dim, self.reset = ("\x1b[2m", "\x1b[0m") if self.out.isatty() else ("", "")
        self.thinking = self.answering = False

    def feed(self, text: str, reasoning_text: str) -> None:
        if reasoning_text:
            if not self.thinking:
                self.out.write(f"{self.dim}[thinking] ")
                self.thinking = True
            self.out.write(f"{self.dim}{reasoning_text}")
        if text:
            if not self.answering:
                self.out.write(f"{self.reset}\n[answer] " if self.thinking else "")
                self.answering = True
            self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self.out.write(self.reset + "\n")
        self.out.flush()


class ProgressBar:
    """A long prompt's prefill on stderr, redrawn in place; erased when the answer starts."""

    WIDTH = 30

    def __init__(self, err: TextIO):
        self.err, self.shown = err, False

    def update(self, progress: PrefillProgress) -> None:
        done, total = progress.prompt_tokens_processed, max(progress.prompt_tokens, 1)
        filled = min(self.WIDTH, self.WIDTH * done // total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.err.write(f"\rprefill [{bar}] {done}/{progress.prompt_tokens} prompt tokens")
        self.err.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.err.write("\r\x1b[2K" if self.err.isatty() else "\n")
            self.err.flush()
            self.shown = False


def summary(final: Chunk) -> str:
    """One line: finish reason, usage, the effort chosen and why, who served it, the failovers."""
    u, d, by = final.usage, final.decision, final.served_by
    line = f"[{final.finish_reason}"
    if u is not None:
        line += (
            f"; prompt {u.prompt_tokens}, completion {u.completion_tokens}, reasoning {u.reasoning_tokens}, "
            f"cached {u.cached_tokens} tokens"
        )
    if d is not None:
        line += f"; effort {d.effort} ({d.reason})"
    if by is not None:
        line += f"; served by {by.region}/{by.replica}"
    for hop in final.failovers or ():
        line += f"; failed over from {hop.from_region} at token {hop.at_token} ({hop.reason})"
    return line + "]"


async def stream_answer(
    endpoints: list[str],
    request: dict,
    api_key: str | None = None,
    tls: dict | None = None,
    model: str = "",
    out: TextIO | None = None,
    err: TextIO | None = None,
    progress: bool | None = None,
) -> Chunk:
    """Print one streamed answer from the first region that can serve it; returns the final chunk.

    ``endpoints``: ``name=host:port`` (or ``host:port``), in the order to try; ``request``: the
    keyword arguments of ``RegionClient.generate``. ``progress``: draw the prefill's progress on
    ``err`` (None: when ``err`` is a terminal); the answer's stream stays clean.
    """
    peers = [dataclasses.replace(parse_endpoint(e), **(tls or {})) for e in endpoints]
    err = err or sys.stderr
    bar = ProgressBar(err) if (err.isatty() if progress is None else progress) else None

    printer = StreamPrinter(out)

    def show(chunk: Chunk) -> None:
        if bar is not None and chunk.progress is not None and not chunk.token_ids:
            bar.update(chunk.progress)
        elif bar is not None and (chunk.token_ids or chunk.finished):
            bar.clear()
        printer.feed(chunk.text, chunk.reasoning_text)

    async with RegionClient(peers, api_key=api_key, max_attempts=len(peers), model=model) as client:
        reply = await collect(client.generate(**request), show)
    for call in reply.tool_calls:  # the answer's calls, whole, after its text
        printer.feed(f"\n[tool call {call.id}] {call.name}({call.arguments})", "")
    printer.end()
    final = reply.final
    if final is None:
        raise ClientError(format_error("UNAVAILABLE", "the stream ended without a final message"))
    if final.error is not None:
        e = final.error
        raise ClientError(format_error(GRPC_NAMES.get(e.code, e.code.upper()), e.message, e.origin))
    err.write(summary(final) + "\n")
    return final


async def check_answer(target: str, prompt: str, cfg=None) -> int:
    """``levante serve --check``: one call through the server's own front door (plaintext only), awaited on
    the server's event loop: a client on a loop of its own leaves grpc's poller posting to it once closed."""
    if cfg is not None and cfg.frontdoor.tls.enabled:
        print("levante: --check skipped: the front door uses TLS; use `levante client` with --tls-ca", flush=True)
        return 0
    api_key = None
    if cfg is not None and cfg.frontdoor.tenants:  # keys configured: call as the first tenant
        first = cfg.frontdoor.tenants[0]
        api_key = first.api_key or os.environ.get(first.api_key_env or "")
    request = dict(prompt=prompt, max_tokens=64, temperature=0.0, timeout_s=300)
    await stream_answer([target], request, api_key=api_key)
    return 0


# ---- command line ------------------------------------------------------------------------------


def add_commands(sub) -> None:
    p = sub.add_parser("client", help="call a Levante front door over gRPC")
    csub = p.add_subparsers(dest="client_cmd", required=True)
    g = csub.add_parser("generate", help="stream an answer; reasoning is shown apart from the answer")
    g.add_argument("prompt", help="the prompt; with --file, the question about the document")
    g.add_argument(
        "--file",
        default=None,
        metavar="PATH",
        help="a document (UTF-8 text) to ask about: sent with the prompt as one user message, "
        "the document's text first, then a blank line, then the prompt",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw the prompt's prefill progress on stderr (default: when stderr is a terminal)",
    )
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--effort", choices=REQUEST_EFFORTS, default="auto", help="reasoning depth (default auto)")
    g.add_argument("--raw", action="store_true", help="send a plain prompt instead of one chat message")
    g.add_argument("--model", default="")
    g.add_argument("--region", default=None, help="preferred region (a front door with peers tries it first)")
    g.add_argument(
        "--regions",
        default=None,
        metavar="NAME=HOST:PORT,...",
        help="several front doors, in the order to try: the client library fails over between them "
        "and resumes a broken stream in the next one (instead of --target)",
    )
    g.set_defaults(func=_cmd_generate)
    m = csub.add_parser("models", help="list the served models")
    m.set_defaults(func=_cmd_models)
    h = csub.add_parser("health", help="grpc.health.v1 status of the server (or one --service)")
    h.add_argument("--service", default="")
    h.set_defaults(func=_cmd_health)
    for c in (g, m, h):
        c.add_argument("--target", default="localhost:50051")
        c.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
        c.add_argument("--api-key", default=os.environ.get("LEVANTE_API_KEY"), help="default: $LEVANTE_API_KEY")
        c.add_argument("--tls-ca", default=None, help="CA bundle that signed the server's certificate")
        c.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS)")
        c.add_argument("--tls-key", default=None, help="client key (mutual TLS)")


def _channel(args) -> grpc.Channel:
    return open_channel(args.target, args.tls_ca, args.tls_cert, args.tls_key)


def _prompt(args) -> str:
    if args.file is None:
        return args.prompt
    try:
        document = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ClientError(f"--file: cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from None
    return f"{document.rstrip()}\n\n{args.prompt}"


def _cmd_generate(args) -> int:
    request = dict(
        prompt=_prompt(args),
        raw=args.raw,
        effort=args.effort,
        preferred_region=args.region,
        timeout_s=args.timeout,
        temperature=args.temperature,
    )
    for name in ("max_tokens", "seed"):
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)
    endpoints = args.regions.split(",") if args.regions else [args.target]
    tls = {k: v for k, v in (("tls_ca", args.tls_ca), ("tls_cert", args.tls_cert), ("tls_key", args.tls_key)) if v}
    asyncio.run(stream_answer(endpoints, request, args.api_key, tls, args.model, progress=args.progress))
    return 0


def _cmd_models(args) -> int:
    with _channel(args) as channel:
        try:
            resp = pb_grpc.InferenceStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=args.timeout or 10, metadata=_metadata(args.api_key)
            )
        except grpc.RpcError as e:
            raise _fail(e) from None
    for m in resp.models:
        print(f"{m.name}\tmax_model_len={m.max_model_len}\t{m.architecture}\tep_size={m.ep_size}")
    return 0


def _cmd_health(args) -> int:
    with _channel(args) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout or 10
            )
        except grpc.RpcError as e:
            unknown = e.code() == grpc.StatusCode.NOT_FOUND
            raise _fail(e, f"unknown service {args.service!r}" if unknown else "") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if status == "SERVING" else 1
