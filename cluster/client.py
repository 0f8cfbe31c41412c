"""``levante client``: call a front door over gRPC (generate, models, health).

Streams the answer as it comes, with the reasoning shown apart (dimmed on a
terminal, after ``[thinking]``) from the answer (after ``[answer]``), then
one summary line on stderr: finish reason, usage, the effort the router chose
and why, and which region and replica served it.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from levante.v1 import inference_pb2 as pb
from levante.v1 import inference_pb2_grpc as pb_grpc

EFFORTS = {"auto": pb.REASONING_EFFORT_AUTO, "none": pb.REASONING_EFFORT_NONE, "low": pb.REASONING_EFFORT_LOW,
           "medium": pb.REASONING_EFFORT_MEDIUM, "high": pb.REASONING_EFFORT_HIGH}
EFFORT_NAMES = {v: k for k, v in EFFORTS.items()}


class ClientError(Exception):
    """A call that failed, as one line: the gRPC status and its details."""


ERRORS = (ClientError,)


def open_channel(target: str, ca: str | None = None, cert: str | None = None, key: str | None = None) -> grpc.Channel:
    if ca is None and cert is None:
        return grpc.insecure_channel(target)
    read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))


def _metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def _fail(e: grpc.RpcError) -> ClientError:
    return ClientError(f"{e.code().name}: {e.details()}")


def stream_generate(channel: grpc.Channel, request: pb.GenerateRequest, api_key: str | None = None,
                    timeout: float | None = None, out=sys.stdout, err=sys.stderr) -> pb.Final:
    """Print one streamed answer; returns its Final message."""
    tty = out.isatty()
    dim, reset = ("\x1b[2m", "\x1b[0m") if tty else ("", "")
    thinking = answering = False
    final = None
    try:
        for msg in pb_grpc.InferenceStub(channel).Generate(request, timeout=timeout, metadata=_metadata(api_key)):
            kind = msg.WhichOneof("kind")
            if kind == "delta":
                if msg.delta.reasoning_text:
                    if not thinking:
                        out.write(f"{dim}[thinking] ")
                        thinking = True
                    out.write(f"{dim}{msg.delta.reasoning_text}")
                if msg.delta.text:
                    if not answering:
                        out.write(f"{reset}\n[answer] " if thinking else "")
                        answering = True
                    out.write(msg.delta.text)
                out.flush()
            elif kind == "final":
                final = msg.final
    except grpc.RpcError as e:
        out.write(reset + "\n")
        raise _fail(e) from None
    out.write(reset + "\n")
    if final is not None:
        u, d = final.usage, final.decision
        err.write(f"[{pb.FinishReason.Name(final.finish_reason).removeprefix('FINISH_REASON_').lower()}; "
                  f"prompt {u.prompt_tokens}, completion {u.completion_tokens}, reasoning {u.reasoning_tokens}, "
                  f"cached {u.cached_tokens} tokens; effort {EFFORT_NAMES.get(d.reasoning_effort, '?')} ({d.reason}); "
                  f"served by {final.served_by.region}/{final.served_by.replica}]\n")
    return final


def build_request(prompt: str, raw: bool = False, max_tokens: int | None = None, temperature: float | None = 0.0,
                  seed: int | None = None, effort: str = "auto", model: str = "",
                  region: str | None = None) -> pb.GenerateRequest:
    req = pb.GenerateRequest(model=model, reasoning_effort=EFFORTS[effort])
    if raw:
        req.prompt = prompt
    else:
        req.chat.messages.add(role="user", content=prompt)
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if temperature is not None:
        req.temperature = temperature
    if seed is not None:
        req.seed = seed
    if region:
        req.preferred_region = region
    return req


def generate_and_print(target: str, prompt: str, cfg=None) -> int:
    """``levante serve --check``: one call through the server's own front door (plaintext only)."""
    if cfg is not None and cfg.frontdoor.tls.enabled:
        print("levante: --check skipped: the front door uses TLS; use `levante client` with --tls-ca", flush=True)
        return 0
    api_key = None
    if cfg is not None and cfg.frontdoor.tenants:  # keys configured: call as the first tenant
        first = cfg.frontdoor.tenants[0]
        api_key = first.api_key or os.environ.get(first.api_key_env or "")
    with open_channel(target) as channel:
        stream_generate(channel, build_request(prompt, max_tokens=64), api_key=api_key, timeout=300)
    return 0


# ---- command line ------------------------------------------------------------------------------

def add_commands(sub) -> None:
    p = sub.add_parser("client", help="call a Levante front door over gRPC")
    csub = p.add_subparsers(dest="client_cmd", required=True)
    g = csub.add_parser("generate", help="stream an answer; reasoning is shown apart from the answer")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--effort", choices=tuple(EFFORTS), default="auto", help="reasoning depth (default auto)")
    g.add_argument("--raw", action="store_true", help="send a plain prompt instead of one chat message")
    g.add_argument("--model", default="")
    g.add_argument("--region", default=None, help="preferred region")
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


def _cmd_generate(args) -> int:
    req = build_request(args.prompt, args.raw, args.max_tokens, args.temperature, args.seed, args.effort,
                        args.model, args.region)
    with _channel(args) as channel:
        stream_generate(channel, req, args.api_key, args.timeout)
    return 0


def _cmd_models(args) -> int:
    with _channel(args) as channel:
        try:
            resp = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=args.timeout or 10,
                                                             metadata=_metadata(args.api_key))
        except grpc.RpcError as e:
            raise _fail(e) from None
    for m in resp.models:
        print(f"{m.name}\tmax_model_len={m.max_model_len}\t{m.architecture}\tep_size={m.ep_size}")
    return 0


def _cmd_health(args) -> int:
    with _channel(args) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                            timeout=args.timeout or 10)
        except grpc.RpcError as e:
            raise _fail(e) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if status == "SERVING" else 1
