"""The OpenAI-compatible routes, as a Starlette app over ``FrontDoor.run``.

A Generate route answers with ``CallResponse``, which watches the connection while the call runs:
a client that leaves cancels its call at once, so the backend closes its stream and the engine
frees the request's KV blocks (Starlette alone notices only at the next write).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cluster.frontdoor.call import CallInfo
from cluster.frontdoor.convert import RequestError
from cluster.frontdoor.errors import Refusal, clip
from cluster.frontdoor.http.requests import CHAT, COMPLETION, HttpRequest, decoder
from cluster.frontdoor.http.responses import STATUS, Collector, SseEncoder, error_body, sse
from cluster.telemetry import tracing
from cluster.telemetry.calls import CallTelemetry
from cluster.types import GRPC_NAMES, INVALID_ARGUMENT, GenerateRequest

if TYPE_CHECKING:
    from cluster.frontdoor.server import FrontDoor

TIMEOUT_HEADER = "levante-timeout-s"  # the call's deadline, in seconds from its arrival
WRITE_TIMEOUT = "write_timeout_s: the client read nothing; stream stopped"
log = logging.getLogger(__name__)


def refusal_response(refusal: Refusal, status: int | None = None) -> JSONResponse:
    headers = {}
    if refusal.retry_after_ms is not None:  # openai's client obeys either
        headers["retry-after"] = str(math.ceil(refusal.retry_after_ms / 1000))
        headers["retry-after-ms"] = str(refusal.retry_after_ms)
    code = status or STATUS.get(refusal.code, (500, ""))[0]
    return JSONResponse(error_body(refusal), status_code=code, headers=headers)


class _TooLarge(Exception):
    pass


class _WriteTimeout(Exception):
    """The client took no event for ``write_timeout_s``."""


async def _body(request: Request, limit: int) -> bytes:
    """The body, read no further than ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"request: {declared} bytes is over max_request_bytes {limit}")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _TooLarge(f"request: over max_request_bytes {limit}")
        parts.append(part)
    return b"".join(parts)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse(raw: bytes) -> Mapping[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError("request", f"the body is not valid JSON ({clip(str(e), 80)})") from None
    if not isinstance(body, dict):
        raise RequestError("request", "the body must be a JSON object")
    return body


def _deadline(request: Request) -> float | None:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise RequestError(TIMEOUT_HEADER, f"must be a positive number of seconds, got {clip(value)}")
    return time.time() + seconds


def _info(request: Request, deadline: float | None) -> CallInfo:
    client = request.client
    peer = f"http:{client.host}:{client.port}" if client is not None else "http:"
    return CallInfo(tuple(request.headers.items()), peer, deadline)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(work: Awaitable[None], receive: Receive) -> bool:
    """Run ``work`` while the client stays; True when it left first (``work`` then was cancelled)."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        left = not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return left
    finally:
        task.cancel()
        watch.cancel()


async def _send_json(send: Send, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


class CallResponse(Response):
    """One Generate call, answered whole or as server-sent events. Refused before anything was sent:
    an error status; refused mid-stream: an ``error`` event, then the stream ends."""

    def __init__(
        self,
        door: FrontDoor,
        options: HttpRequest,
        info: CallInfo,
        decode: Callable[[Any], GenerateRequest],
        call: CallTelemetry | None,
    ):
        self.door, self.options, self.info, self.decode, self.call = door, options, info, decode, call
        self.code, self.details = "OK", None  # how it ended, as telemetry counts it (gRPC status names)

    async def __call__(self, _scope: Scope, receive: Receive, send: Send) -> None:
        work = self._stream(send) if self.options.stream else self._whole(send)
        try:
            if await _until_disconnect(work, receive):
                self.code = "CANCELLED"
        except BaseException as e:
            self.code, self.details = "UNKNOWN", repr(e)
            raise
        finally:
            if self.call is not None:
                self.call.done(self.code, self.details)

    def _refused(self, refusal: Refusal) -> None:
        self.code, self.details = GRPC_NAMES.get(refusal.code, "UNKNOWN"), refusal.details

    def _messages(self, make: Callable[[GenerateRequest, str], Any]) -> AsyncIterator[Any]:
        return self.door.run(self.info, self.decode, make, self.call)

    async def _whole(self, send: Send) -> None:
        collected: list[Collector] = []

        def make(request: GenerateRequest, client_id: str) -> Collector:
            collected.append(Collector(self.options, client_id, request.model))
            return collected[0]

        messages = self._messages(make)
        try:
            async with contextlib.aclosing(messages):
                async for _ in messages:
                    pass
        except Refusal as r:
            self._refused(r)
            await _send_json(send, refusal_response(r))
            return
        await _send_json(send, JSONResponse(collected[0].body()))

    async def _stream(self, send: Send) -> None:
        messages = self._messages(lambda request, client_id: SseEncoder(self.options, client_id, request.model))
        async with contextlib.aclosing(messages):
            try:
                first = await anext(messages)  # the status is decided by now
            except Refusal as r:
                self._refused(r)
                await _send_json(send, refusal_response(r))
                return
            headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                await self._write(send, first)
                async for message in messages:
                    await self._write(send, message)
            except _WriteTimeout:
                self.code, self.details = "RESOURCE_EXHAUSTED", WRITE_TIMEOUT
                return  # unfinished: uvicorn closes the connection, which the client does not read anyway
            except Refusal as r:
                self._refused(r)
                await send({"type": "http.response.body", "body": sse(error_body(r)).encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _write(self, send: Send, message: str) -> None:
        """One event, taken by the client within ``write_timeout_s``; a client that reads nothing for that
        long loses its stream (and the engine its request), as over gRPC."""
        limit = self.door.config.write_timeout_s
        try:
            async with asyncio.timeout(limit):
                await send({"type": "http.response.body", "body": message.encode(), "more_body": True})
        except TimeoutError:
            log.warning("write timeout: %s read nothing for %gs; its stream was stopped", self.info.peer, limit)
            raise _WriteTimeout from None


def _telemetry(door: FrontDoor, request: Request) -> CallTelemetry | None:
    if door.metrics is None and not tracing.active():
        return None
    return CallTelemetry(door.metrics, dict(request.headers.items()), door.region)


def generate_route(door: FrontDoor, kind: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        call = _telemetry(door, request)
        try:
            raw = await _body(request, door.config.max_request_bytes)
            options, decode = decoder(_parse(raw), kind)
            info = _info(request, _deadline(request))
        except _TooLarge as e:
            return _early(call, Refusal(INVALID_ARGUMENT, str(e), "request"), 413)
        except RequestError as e:
            return _early(call, Refusal(INVALID_ARGUMENT, str(e), e.field))
        return CallResponse(door, options, info, decode, call)

    return endpoint


def _early(call: CallTelemetry | None, refusal: Refusal, status: int | None = None) -> JSONResponse:
    """A call refused before it reached the door's admission."""
    if call is not None:
        call.done(GRPC_NAMES.get(refusal.code, "UNKNOWN"), refusal.details)
    return refusal_response(refusal, status)


def _models_route(door: FrontDoor) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            door.authenticate(tuple(request.headers.items()))
            models = await door.models()
        except Refusal as r:
            return refusal_response(r)
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "levante", "max_model_len": m.max_model_len}
            for m in models
        ]
        return JSONResponse({"object": "list", "data": data})

    return endpoint


def _health_route(door: FrontDoor) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        serving = door.serving
        return JSONResponse({"status": "serving" if serving else "not_serving"}, status_code=200 if serving else 503)

    return endpoint


def _metrics_route(door: FrontDoor) -> Callable[[Request], Awaitable[Response]]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def endpoint(request: Request) -> Response:
        assert door.metrics is not None
        return Response(generate_latest(door.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_argument")
    message = f"{request.method} {clip(request.url.path, 80)}: {exc.detail}"
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=exc.status_code)


def build_app(door: FrontDoor) -> Starlette:
    routes = [
        Route("/v1/chat/completions", generate_route(door, CHAT), methods=["POST"]),
        Route("/v1/completions", generate_route(door, COMPLETION), methods=["POST"]),
        Route("/v1/models", _models_route(door), methods=["GET"]),
        Route("/health", _health_route(door), methods=["GET"]),
    ]
    if door.metrics is not None:
        routes.append(Route("/metrics", _metrics_route(door), methods=["GET"]))
    return Starlette(routes=routes, exception_handlers={404: _http_error, 405: _http_error})
