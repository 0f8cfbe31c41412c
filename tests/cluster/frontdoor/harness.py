"""A real grpc.aio front door on an event loop in a thread, and plain sync grpc clients to call it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from cluster.config import FrontDoorConfig
from cluster.frontdoor import FrontDoor
from cluster.types import Backend, Chunk, ChunkError, Decision, GenerateRequest, ModelInfo, ServedBy
from engine.types import Usage
from levante.v1 import inference_pb2 as pb
from levante.v1 import inference_pb2_grpc as pb_grpc

GENERATE = "/levante.v1.Inference/Generate"
MODEL = "tiny-moe"


@contextlib.contextmanager
def tiny_engine(path: str, max_model_len: int = 1000, **config: Any) -> Iterator[Any]:
    """A real native engine on a tiny model (``path``) with Mistral's v3 SentencePiece tokenizer, small
    enough for a test module; ``config``: further EngineConfig sections. Shut down on exit."""
    from engine.api import create_engine
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    eng = create_engine(
        EngineConfig(
            model=ModelConfig(model=path, tokenizer=spm_tokenizer()),
            cache=CacheConfig(num_blocks=64),
            scheduler=SchedulerConfig(max_model_len=max_model_len),
            **config,
        )
    )
    try:
        yield eng
    finally:
        eng.shutdown()


def spm_tokenizer() -> str:
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.origin, "mistral_common is not installed"
    return os.path.join(os.path.dirname(spec.origin), "data", "mistral_instruct_tokenizer_240323.model.v3")


class LoopThread:
    """The server's event loop, in its own thread, so tests can use blocking grpc clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def engine_backend(loop: LoopThread, engine: Any, region: str = "test-region") -> Backend:
    """A LocalBackend over a real engine, serving it as ``MODEL`` with the engine's own limits."""
    from cluster.backends.local import LocalBackend

    info = loop.run(engine.info())
    return LocalBackend(engine, ModelInfo(MODEL, info.max_model_len, info.architecture, info.ep_size), region)


@contextlib.contextmanager
def serving(
    loop: LoopThread, backend: Backend, config: FrontDoorConfig | None = None, model_name: str = MODEL
) -> Iterator[FrontDoor]:
    door = FrontDoor(config or FrontDoorConfig(port=0), backend, "test-region", model_name)
    loop.run(door.start())
    try:
        yield door
    finally:
        loop.run(door.stop())


def channel(door: FrontDoor, creds: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    target = f"localhost:{door.port}"
    return grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)


def stub(ch: grpc.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(ch)


def generate(
    ch: grpc.Channel, req: pb.GenerateRequest | bytes, timeout: float = 30.0, metadata: tuple[tuple[str, str], ...] = ()
) -> list[pb.GenerateResponse]:
    """All responses of one call; a raw bytes request goes out as is (bad UTF-8, oversized)."""
    raw = req if isinstance(req, bytes) else req.SerializeToString()
    call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
    return list(call(raw, timeout=timeout, metadata=metadata))


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    try:
        fn()
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded; expected an error")


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class ScriptedBackend(Backend):
    """A backend whose behaviour a test sets: an error, a slow first chunk, a stream held open."""

    def __init__(self) -> None:
        self.is_ready = True
        self.error: ChunkError | None = None  # answer every call with this
        self.first_delay_s = 0.0
        self.hold: asyncio.Event | None = None  # when set, streams wait for it before their final chunk
        self.requests: list[GenerateRequest] = []
        self.closed: list[str] = []  # request ids whose generator was closed before finishing
        self.started = 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        self.started += 1
        finished = False
        try:
            await asyncio.sleep(self.first_delay_s)
            if self.error is not None:
                yield Chunk(finished=True, error=self.error)
                return
            yield Chunk(token_ids=[7], text="hi", decision=Decision("none", "scripted"))
            if self.hold is not None:
                await self.hold.wait()
            finished = True
            yield Chunk(
                token_ids=[8],
                text="!",
                finished=True,
                finish_reason="stop",
                usage=Usage(3, 2, 0, 0, "none"),
                served_by=ServedBy("test-region", "fake-0"),
            )
        finally:
            if not finished:
                self.closed.append(request.request_id)

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo(MODEL, max_model_len=256, architecture="Fake", ep_size=1)]

    async def ready(self) -> bool:
        return self.is_ready


@contextlib.contextmanager
def running_region(loop: LoopThread, cfg: Any, name: str = "region", start_timeout_s: float = 600) -> Iterator[Any]:
    """A ``RegionServer`` (its own Ray cluster, temp dir and ports) started on ``loop``, stopped on exit."""
    from cluster.region import RegionServer  # Ray: only for the tests that start a region

    server = RegionServer(cfg, progress=lambda msg: print(f"[{name}] {msg}"))
    try:
        loop.run(server.start(), timeout=start_timeout_s)
        yield server
    finally:
        loop.run(server.stop(), timeout=120)
