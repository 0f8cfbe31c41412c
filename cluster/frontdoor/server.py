"""The front door: ``levante.v1.Inference`` on grpc.aio, with health, reflection, TLS and drain, and the
OpenAI-compatible HTTP API (``cluster.frontdoor.http``) on the same event loop.

One transport-neutral ``FrontDoor.run`` serves a call (authenticate, admit or shed, decode, tenant
rewriting, id claims, the backend's stream with heartbeats, deadline and backend timeout) and ends a
refused one with a ``Refusal``; the gRPC servicer below and the HTTP routes are adapters around it.

gRPC requests arrive as bytes (no grpc deserializer) so that convert.py can name
the bad field of a malformed one; responses leave as bytes convert.py made.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NoReturn

import grpc
from grpc_reflection.v1alpha import reflection

from cluster.config import FrontDoorConfig
from cluster.frontdoor.auth import AuthError, LimitExceeded, Tenant, Tenants
from cluster.frontdoor.call import CallInfo, Encoder, T
from cluster.frontdoor.convert import (
    SERVICE_NAME,
    Limits,
    RequestError,
    ResponseEncoder,
    decode_generate,
    decode_list_models,
    encode_models,
)
from cluster.frontdoor.errors import Refusal, abort
from cluster.frontdoor.grpc_health import HEALTH_SERVICE_NAME, NOT_SERVING, POLL_S, HealthReporter
from cluster.frontdoor.http.server import HttpServer
from cluster.frontdoor.isolation import InflightIds, cache_salt, engine_request_id
from cluster.frontdoor.shedding import Connections, refuse, written
from cluster.frontdoor.tls import server_credentials
from cluster.policy.effort import lowest_effort
from cluster.telemetry import tracing
from cluster.telemetry.calls import CallTelemetry, call_code
from cluster.telemetry.metrics import ServerMetrics
from cluster.types import (
    CACHE_SALT,
    DEADLINE_EXCEEDED,
    EFFORTS,
    ERROR_CODES,
    FORWARDED_FROM,
    INVALID_ARGUMENT,
    MAX_EFFORT,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    Backend,
    Chunk,
    ChunkError,
    GenerateRequest,
    ModelInfo,
)

log = logging.getLogger(__name__)

_STATUS = {code: grpc.StatusCode[code.upper()] for code in ERROR_CODES}  # each chunk code is a gRPC status


class FrontDoor:
    def __init__(
        self,
        config: FrontDoorConfig,
        backend: Backend,
        region: str,
        model_name: str,
        metrics: ServerMetrics | None = None,
    ):
        self.config, self.backend, self.region, self.model_name = config, backend, region, model_name
        self.metrics = metrics  # None: metrics off (cluster/telemetry)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = HealthReporter(SERVICE_NAME, self._serving)
        self._tenants = Tenants({})
        self._model: ModelInfo | None = None
        self._inflight = 0
        self._ids = InflightIds()  # engine ids of the calls in flight: a duplicate is refused
        self._connections = Connections(config.max_streams_per_connection)
        self._idle = asyncio.Event()
        self._draining = False  # a real drain (SIGTERM): it ends in stop(), nothing undoes it
        self._paused = False  # an admin's drain (drills): RESTORE undoes it
        self.admin = None  # an AdminService (frontdoor.admin), set by the owner before start()
        self.admin_port = 0  # the admin server's own port, once started
        self.http: HttpServer | None = None  # the OpenAI-compatible API, while it runs (frontdoor.http)
        # peer-only metadata that a caller without the peer role sent, and we ignored (also in metrics)
        self.ignored_metadata: collections.Counter[str] = collections.Counter()
        self._warned: set[tuple[str, str]] = set()

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and serve; returns the port (useful with ``port=0``). Reads keys and certificates now."""
        self._tenants = Tenants.from_config(self.config.tenants, os.environ)
        creds = server_credentials(self.config.tls)
        # grpc's own limit sits above ours so an oversized request reaches convert.py and gets a clear error.
        limit = self.config.max_request_bytes + max(self.config.max_request_bytes, 1 << 20)
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit)],
            maximum_concurrent_rpcs=self.config.maximum_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE_NAME,
                    {
                        # bytes in, bytes out; written by us, each message within write_timeout_s
                        "Generate": grpc.unary_stream_rpc_method_handler(
                            written(self._generate, self.config.write_timeout_s, self.config.retry_after_ms)
                        ),
                        "ListModels": grpc.unary_unary_rpc_method_handler(self._list_models),
                    },
                ),
            )
        )
        self._health.add_to(server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
        if self.admin is not None:  # its own server and port, loopback by default: never the public one
            self.admin_port = await self.admin.start(self.config, self._tenants, os.environ)
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind": say which key to change
            self.port = 0
        if not self.port:
            if self.admin is not None:
                await self.admin.stop()
            raise OSError(f"frontdoor.port: cannot bind {address} (in use?)")
        await server.start()
        self._server = server
        self._idle.set()
        if self.config.http.enabled:
            try:
                self.http = await HttpServer.start(self, self.config)
            except BaseException:
                await self.stop()
                raise
        await self._health.refresh()
        self._health.start()
        log.info(
            "front door on %s (port %d, tls=%s, region %s, http %s)",
            self.config.host,
            self.port,
            self.config.tls.enabled,
            self.region,
            self.http.url if self.http is not None else "off",
        )
        return self.port

    async def drain(self) -> None:
        """Report NOT_SERVING, refuse new calls, let running streams finish (up to drain_timeout_s), stop."""
        self._draining = True
        await self._health.set(NOT_SERVING)
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
        except TimeoutError:
            log.warning(
                "drain: %d calls still running after %.1fs; cancelling them",
                self._inflight,
                self.config.drain_timeout_s,
            )
        await self.stop()

    async def pause(self) -> None:
        """A drain that can be undone (drills): NOT_SERVING and new calls refused; running streams go on."""
        self._paused = True
        await self._health.set(NOT_SERVING)

    async def resume(self) -> None:
        """Undo ``pause``; refused (RuntimeError) while a real drain runs: that one only ends in stop()."""
        if self._draining:
            raise RuntimeError("the front door is draining to shut down (SIGTERM); only an admin drain can be undone")
        self._paused = False
        await self._health.refresh()

    async def stop(self) -> None:
        """Stop at once: running calls are cancelled (their engine requests aborted)."""
        self._health.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # ---- backend ------------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """The health this door reports now (cached; false while draining or paused)."""
        return self._health.serving and not self._draining and not self._paused

    async def _serving(self) -> bool:
        return not self._draining and not self._paused and await self._backend_ready()

    async def _backend_ready(self) -> bool:
        try:
            return await asyncio.wait_for(self.backend.ready(), POLL_S)
        except Exception:  # noqa: BLE001 -- a backend that cannot answer is not ready
            return False

    async def _limits(self) -> Limits:
        if self._model is None:  # asked once: the served model does not change under a running server
            try:
                models = await self.backend.models()
            except Exception as e:
                raise LookupError(f"backend: cannot list its models: {e!r}") from e
            self._model = next((m for m in models if m.name == self.model_name), models[0] if models else None)
        if self._model is None:
            raise LookupError("backend: serves no model")
        return Limits(self.model_name, self._model.max_model_len, self.config.max_request_bytes, self.config.limits)

    # ---- one call, whatever the transport -----------------------------------------------------

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Tenant:
        try:
            return self._tenants.authenticate(metadata)
        except AuthError as e:
            raise Refusal(UNAUTHENTICATED, str(e), "authorization") from None

    async def models(self) -> list[ModelInfo]:
        try:
            return await self.backend.models()
        except Exception as e:  # noqa: BLE001 -- a backend that cannot answer: retryable, no stack trace
            raise Refusal(UNAVAILABLE, f"backend: cannot list its models: {e!r}") from None

    async def run(
        self,
        info: CallInfo,
        decode: Callable[[Limits], GenerateRequest],
        make_encoder: Callable[[GenerateRequest, str], Encoder[T]],
        call: CallTelemetry | None,
    ) -> AsyncIterator[T]:
        """One Generate call: admit it, check it, stream its messages. Ends with ``Refusal`` when refused;
        the gRPC servicer and the HTTP routes are adapters around it. ``decode`` turns the body into a
        request (raising ``RequestError`` or ``Refusal``); ``make_encoder`` turns chunks into messages."""
        async with self._admitted(info, decode, call) as (request, client_id):
            async for message in self._stream(request, info, make_encoder(request, client_id), call):
                yield message

    @contextlib.asynccontextmanager
    async def _admitted(
        self, info: CallInfo, decode: Callable[[Limits], GenerateRequest], call: CallTelemetry | None
    ) -> AsyncIterator[tuple[GenerateRequest, str]]:
        """The checked request and the client's id for it, counted in flight while the block runs."""
        if self._draining or self._paused:
            raise Refusal(UNAVAILABLE, "server: draining; retry on another front door")
        tenant = self.authenticate(info.metadata)
        retry = self.config.retry_after_ms
        if self._inflight >= self.config.max_inflight:
            raise Refusal(
                RESOURCE_EXHAUSTED, f"server: {self._inflight} calls in flight (max_inflight); retry later", "", retry
            )
        try:
            self._tenants.admit(tenant)
        except LimitExceeded as e:
            raise Refusal(RESOURCE_EXHAUSTED, str(e), "", retry) from None
        self._inflight += 1
        self._idle.clear()
        try:
            request, client_id = await self._request(tenant, info, decode, call)
            async with self._ids.claimed(request.request_id, client_id):
                yield request, client_id
        finally:
            self._tenants.release(tenant)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _request(
        self, tenant: Tenant, info: CallInfo, decode: Callable[[Limits], GenerateRequest], call: CallTelemetry | None
    ) -> tuple[GenerateRequest, str]:
        metadata = info.headers
        forwarded_from, ceiling = self._peer_metadata(tenant, metadata)
        decoded = await self._checked(decode, forwarded_from)
        if decoded.resume is not None and not tenant.is_peer:  # tokens the engine would take on trust
            raise Refusal(
                PERMISSION_DENIED,
                "resume: only a peer region may resume a stream (this caller's key has no peer role)",
                "resume",
            )
        client_id = decoded.request_id  # what the client sees; the engine's id is per tenant
        salt = cache_salt(tenant.cache_group or tenant.name, metadata.get(CACHE_SALT))
        request = dataclasses.replace(
            decoded,
            request_id=engine_request_id(tenant.name, client_id),
            params=dataclasses.replace(decoded.params, cache_salt=salt),
            tenant=tenant.name,
            max_effort=lowest_effort(tenant.max_effort, ceiling),  # the forwarding tenant's ceiling holds here
            deadline=info.deadline,
            forwarded_from=forwarded_from,
            trace_context=call.carrier() if call is not None else None,
            # a forwarding region already holds its caller to the limit; its own tenant's would be wrong
            first_token_timeout_s=tenant.first_token_timeout_s if forwarded_from is None else None,
        )
        if call is not None:
            call.admitted(request)
        return request, client_id

    def _peer_metadata(self, tenant: Tenant, metadata: dict[str, str]) -> tuple[str | None, str | None]:
        """(forwarded_from, the original tenant's effort ceiling): trusted from a peer only. Anyone else's
        are ignored, counted and logged (once per tenant and key: a client cannot flood the log); a forged
        forwarded-from would turn off the caller's failover and its tenant's first-token limit."""
        forwarded_from, ceiling = metadata.get(FORWARDED_FROM), metadata.get(MAX_EFFORT)
        if tenant.is_peer:
            return forwarded_from, ceiling if ceiling in EFFORTS else None
        for key in (FORWARDED_FROM, MAX_EFFORT):
            if metadata.get(key) is not None:
                self.ignored_metadata[key] += 1
                if self.metrics is not None:
                    self.metrics.untrusted_metadata.labels(key).inc()
                if (tenant.name, key) not in self._warned:
                    self._warned.add((tenant.name, key))
                    log.warning("ignored %s metadata from tenant %r: it has no peer role (counted)", key, tenant.name)
        return None, None

    async def _checked(
        self, decode: Callable[[Limits], GenerateRequest], forwarded_from: str | None
    ) -> GenerateRequest:
        try:
            request = decode(await self._limits())
        except RequestError as e:
            raise Refusal(INVALID_ARGUMENT, str(e), e.field) from None
        except LookupError as e:
            raise Refusal(UNAVAILABLE, str(e)) from None
        # A region router can still send the call to a peer region; a call a peer forwarded cannot go on.
        can_go_elsewhere = self.backend.fails_over and forwarded_from is None
        if not self._health.serving and not can_go_elsewhere:  # cached: asking a busy backend per call fails calls
            raise Refusal(UNAVAILABLE, "backend: no replica is ready")
        return request

    async def _stream(
        self, request: GenerateRequest, info: CallInfo, encoder: Encoder[T], call: CallTelemetry | None
    ) -> AsyncIterator[T]:
        """The backend's chunks as messages. The backend is read by a task of its own, so that while it is
        silent the caller still hears from us every ``heartbeat_s`` (when its encoder sends heartbeats)."""
        if not self._connections.admit(info.peer):
            raise Refusal(
                RESOURCE_EXHAUSTED,
                f"server: {self.config.max_streams_per_connection} streams on this connection "
                "(max_streams_per_connection); retry later or open another connection",
                "",
                self.config.retry_after_ms,
            )
        chunks: asyncio.Queue[Chunk | None] = asyncio.Queue()
        pump = asyncio.create_task(_pump(self.backend.generate(request), chunks))
        try:
            heard = sent = time.monotonic()  # the backend's last chunk; our last message (or heartbeat moment)
            while True:
                chunk = await self._next(chunks, request, heard, sent)
                if chunk is None:  # nothing for heartbeat_s: still working on it
                    sent = time.monotonic()  # the next moment is heartbeat_s on, heartbeat sent or not
                    if encoder.progress:
                        yield encoder.heartbeat()
                    continue
                heard = time.monotonic()
                if chunk.error is not None:
                    raise self._refusal(chunk.error)
                if call is not None:
                    call.chunk(chunk)
                for message in encoder.encode(chunk):
                    sent = time.monotonic()
                    yield message
                if chunk.finished:
                    return
        finally:
            self._connections.release(info.peer)
            pump.cancel()  # the backend's generator closes, and aborts its engine request (cancel, deadline, error)
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    def _refusal(self, error: ChunkError) -> Refusal:
        """The backend's error as this call's end (a peer's refusal keeps its own details); a full
        backend's with the retry hint."""
        retry = self.config.retry_after_ms if error.code == RESOURCE_EXHAUSTED else None
        return Refusal(error.code, error.details, error.field, retry)

    async def _next(
        self, chunks: asyncio.Queue[Chunk | None], request: GenerateRequest, heard: float, sent: float
    ) -> Chunk | None:
        """The next chunk; None when it is time for a heartbeat. Refuses the call when the backend was silent
        for ``backend_timeout_s`` or the call's deadline passed.

        The deadline is enforced here too: grpc cancels the call at its deadline, but freeing
        the engine's KV blocks should not depend on when that cancellation lands.
        """
        cfg, now = self.config, time.monotonic()
        left = None if request.deadline is None else request.deadline - time.time()
        silent_left = cfg.backend_timeout_s - (now - heard)
        timeout = min(t for t in (left, silent_left, cfg.heartbeat_s - (now - sent)) if t is not None)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):  # in this task: no task per chunk, as wait_for makes
                chunk = await chunks.get()
        except TimeoutError:
            if left is not None and time.time() >= request.deadline:  # type: ignore[operator]
                raise Refusal(DEADLINE_EXCEEDED, "deadline: passed before the stream finished") from None
            if time.monotonic() - heard >= cfg.backend_timeout_s:
                raise Refusal(UNAVAILABLE, f"backend: no response within {cfg.backend_timeout_s:g}s") from None
            return None
        if chunk is None:
            raise Refusal(UNAVAILABLE, "backend: the stream ended before its final chunk")
        return chunk

    # ---- gRPC: levante.v1.Inference ------------------------------------------------------------

    async def _list_models(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            self.authenticate(context.invocation_metadata() or ())
            try:
                decode_list_models(raw)
            except RequestError as e:
                raise Refusal(INVALID_ARGUMENT, str(e), e.field) from None
            return encode_models(await self.models())
        except Refusal as r:
            await _abort(context, r)

    async def _generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # Telemetry sees every call, refused ones included; with tracing and metrics off there is none.
        call = None
        if self.metrics is not None or tracing.active():
            call = CallTelemetry(self.metrics, dict(context.invocation_metadata() or ()), self.region)
        failure: BaseException | None = None
        try:
            remaining = context.time_remaining()
            info = CallInfo(
                tuple(context.invocation_metadata() or ()),
                context.peer() or "",
                None if remaining is None else time.time() + remaining,
            )
            messages = self.run(info, lambda limits: decode_generate(raw, limits), _grpc_encoder, call)
            async with contextlib.aclosing(messages):  # type: ignore[type-var]
                async for message in messages:
                    yield message
        except Refusal as r:
            await _abort(context, r)
        except BaseException as e:
            failure = e
            raise
        finally:
            if call is not None:
                call.done(*call_code(context, failure))


def _grpc_encoder(request: GenerateRequest, client_id: str) -> ResponseEncoder:
    return ResponseEncoder(client_id, progress=request.stream_progress)


async def _abort(context: grpc.aio.ServicerContext, refusal: Refusal) -> NoReturn:
    """End a gRPC call with ``refusal``: its status, and the retry hint when it has one."""
    if refusal.retry_after_ms is not None:
        await refuse(context, refusal.details, refusal.retry_after_ms)
    await abort(context, _STATUS.get(refusal.code, grpc.StatusCode.INTERNAL), refusal.details)


async def _pump(backend: AsyncIterator[Chunk], chunks: asyncio.Queue[Chunk | None]) -> None:
    """The backend's chunks into ``chunks``, then None (also when it broke); cancelling it closes the
    backend's generator."""
    try:
        async with contextlib.aclosing(backend) as stream:  # type: ignore[type-var]
            async for chunk in stream:
                chunks.put_nowait(chunk)
                if chunk.finished:
                    return
    except Exception:  # a backend that raises instead of sending an error chunk: the call ends UNAVAILABLE
        log.exception("backend stream failed")
    finally:
        chunks.put_nowait(None)
