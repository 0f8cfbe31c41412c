"""``PeerBackend``: another region's front door, called over gRPC as any client would.

Requests go as bytes made by ``cluster.frontdoor.convert`` and come back as chunks; a failed
call becomes an error chunk with the peer's own details and the peer as its ``origin``: a peer
that died or broke the call is UNAVAILABLE (the caller moves on), one that refused the request
keeps its code (``cluster.regions.codes`` says which fail over). ``forwarded_from`` marks calls a
router makes, so the peer serves them itself instead of forwarding them again; such calls also carry
the tenant's effort ceiling, which the peer enforces (AUTO included). A peer trusts both, and a
``resume``, only from a key with the peer role: a region router presents one (``api_key_env``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.chunks import error_chunk
from cluster.config import PeerConfig
from cluster.frontdoor.convert import SERVICE_NAME, decode_models, decode_response, encode_generate
from cluster.policy.effort import within_ceiling
from cluster.regions.codes import from_grpc
from cluster.telemetry.tracing import grpc_metadata
from cluster.types import (
    CACHE_SALT,
    FORWARDED_FROM,
    GRPC_NAMES,
    MAX_EFFORT,
    UNAVAILABLE,
    Backend,
    Chunk,
    ChunkError,
    GenerateRequest,
    ModelInfo,
)


def _read(peer: PeerConfig, key: str) -> bytes | None:
    path = getattr(peer, key)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"regions.peers[{peer.name}].{key}: cannot read {path}: {e.strerror or e}") from None


def peer_api_key(peer: PeerConfig, environ: dict[str, str] | None = None) -> str | None:
    """The key to present to ``peer``; a named environment variable that is not set is a config error."""
    if peer.api_key_env is None:
        return None
    env = os.environ if environ is None else environ
    if not env.get(peer.api_key_env):
        raise ValueError(f"regions.peers[{peer.name}].api_key_env: environment variable {peer.api_key_env} is not set")
    return env[peer.api_key_env]


class PeerBackend(Backend):
    def __init__(
        self,
        peer: PeerConfig,
        forwarded_from: str | None = None,
        call_timeout_s: float = 10.0,
        api_key: str | None = None,
    ):
        self.peer = peer
        self.forwarded_from = forwarded_from  # this region's name; None: an end client (the client library)
        self.call_timeout_s = call_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._credentials = None
        # Read now: a missing file or key is a config error when the region starts, not on every call.
        if peer.tls_ca is not None:
            self._credentials = grpc.ssl_channel_credentials(
                _read(peer, "tls_ca"), _read(peer, "tls_key"), _read(peer, "tls_cert")
            )
        self._api_key = api_key or peer_api_key(peer)

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:  # made on first use, inside the event loop that uses it
            target = self.peer.target
            self._channel = (
                grpc.aio.secure_channel(target, self._credentials)
                if self._credentials
                else grpc.aio.insecure_channel(target)
            )
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _metadata(
        self,
        trace_context: dict[str, str] | None = None,
        cache_salt: str | None = None,
        max_effort: str | None = None,
    ) -> list[tuple[str, str]]:
        md = [("authorization", f"Bearer {self._api_key}")] if self._api_key else []
        if self.forwarded_from is not None:
            md.append((FORWARDED_FROM, self.forwarded_from))
            if max_effort is not None:  # the tenant's ceiling travels with its call
                md.append((MAX_EFFORT, max_effort))
        if cache_salt is not None:
            md.append((CACHE_SALT, cache_salt))
        return md + grpc_metadata(trace_context)  # W3C traceparent/tracestate: the peer's spans join the trace

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        request = within_ceiling(request)
        timeout = None if request.deadline is None else max(0.0, request.deadline - time.time())
        call = self.channel.unary_stream(f"/{SERVICE_NAME}/Generate")(
            encode_generate(request),
            timeout=timeout,
            metadata=self._metadata(request.trace_context, request.params.cache_salt, request.max_effort),
        )
        try:
            async for raw in call:
                chunk = decode_response(raw)
                yield chunk
                if chunk.finished:
                    return
            yield error_chunk(UNAVAILABLE, "region", f"{self.peer.name}: the stream ended before its final message")
        except grpc.aio.AioRpcError as e:
            yield self._failed(e)
        finally:
            call.cancel()  # no-op when finished; otherwise the peer aborts its engine request

    def _failed(self, e: grpc.aio.AioRpcError) -> Chunk:
        code, details = from_grpc(e.code()), e.details() or ""
        if GRPC_NAMES[code] != e.code().name:  # e.g. CANCELLED by a dying peer: keep what it really was
            details = f"{e.code().name}: {details}"
        return Chunk(finished=True, error=ChunkError(code, "", details or "(no details)", origin=self.peer.name))

    async def models(self) -> list[ModelInfo]:
        raw = await self.channel.unary_unary(f"/{SERVICE_NAME}/ListModels")(
            b"", timeout=self.call_timeout_s, metadata=self._metadata()
        )
        return decode_models(raw)

    async def check(self, timeout_s: float) -> tuple[bool, str]:
        """One grpc.health.v1 Check: (serving, why not)."""
        try:
            resp = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False, f"timeout: no health answer within {timeout_s:g}s"
            return False, f"{e.code().name.lower()}: {e.details()}"
        except asyncio.CancelledError:
            raise
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            return False, f"not serving: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
        return True, ""

    async def ready(self) -> bool:
        return (await self.check(self.call_timeout_s))[0]
