"""The Ray actors of one expert-parallel group: rank 0 drives the engine, ranks 1.. follow it.

Rank 0 runs the whole engine (scheduler, sampler, detokenizer) behind
``EngineClient`` and broadcasts each step to the other ranks, which run only
the model forward on their slice of the experts. The replica pulls chunks
from rank 0 (``next``), so a chunk carries every token produced since the
last pull: one Ray round trip per chunk, not per token.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import ray

from cluster.chunks import engine_error_chunk, error_chunk, merge_deltas
from cluster.config import TracingConfig
from cluster.telemetry import spans, tracing
from cluster.telemetry.hookup import RANK0
from cluster.types import Chunk, Prompt
from engine.api import (
    EngineClient,
    EngineConfig,
    EngineError,
    EngineInfo,
    EngineStats,
    RequestDelta,
    Resume,
    SamplingParams,
    create_engine,
    run_expert_worker,
)
from engine.config import DeviceUnavailableError


def free_tcp_address() -> str:
    """``tcp://<this node's ip>:<free port>`` for torch.distributed's rendezvous.

    The port is free when we look; rank 0 binds it moments later. A clash
    fails the group's start, and the gang restart picks another.
    """
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return f"tcp://{ip}:{s.getsockname()[1]}"


_T = TypeVar("_T")


def _on_reserved_gpu(start: Callable[[], _T]) -> _T:
    """``start()``; a CUDA device the rank cannot see is a placement fault, so the error names the cluster key."""
    try:
        return start()
    except DeviceUnavailableError as e:
        raise DeviceUnavailableError(
            f"replica.accelerator: gpu reserved a GPU for this rank, which cannot use it: {e}"
        ) from None


def start_rank_engine(config: EngineConfig, placement_group: Any = None) -> EngineClient:
    """Rank 0's engine (blocks until every rank has joined the process group and loaded its experts)."""
    return _on_reserved_gpu(lambda: create_engine(config, placement_group))


def run_rank_worker(config: EngineConfig, on_ready: Callable[[EngineInfo], None] | None = None) -> None:
    """Ranks 1..: run rank 0's steps until it stops the group."""
    _on_reserved_gpu(lambda: run_expert_worker(config, on_ready=on_ready))


@ray.remote
class DriverRank:
    def __init__(self, tracing_cfg: TracingConfig | None = None, region: str = "") -> None:
        self.engine: EngineClient | None = None
        self._queues: dict[str, asyncio.Queue[RequestDelta]] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._early_aborts: dict[str, None] = {}  # aborts that overtook their submit (ordered, bounded)
        self._trace_parents: dict[str, dict[str, str]] = {}  # request id -> the replica span's context
        if tracing_cfg is not None:
            tracing.setup_tracing(tracing_cfg, region, RANK0)

    def rendezvous_address(self) -> str:
        return free_tcp_address()

    async def start(self, config: EngineConfig) -> EngineInfo:
        # Blocks until every rank has joined the process group and loaded its experts. vLLM's
        # workers (several GPUs per engine) go into this replica's placement group, one per bundle.
        group = ray.util.get_current_placement_group() if config.backend == "vllm" else None
        self.engine = await asyncio.to_thread(start_rank_engine, config, group)
        return await self.engine.info()

    async def submit(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        resume: Resume | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> Chunk | None:
        """None when admitted; an error chunk naming the bad field otherwise.

        ``trace_context``: the replica's span; the engine's queue, prefill and decode spans go under it."""
        assert self.engine is not None
        try:
            await self.engine.submit(request_id, prompt, params, resume=resume)
        except EngineError as e:
            return engine_error_chunk(e)
        if request_id in self._early_aborts:  # the caller gave up while we admitted it
            del self._early_aborts[request_id]
            await self.engine.abort(request_id)
            return error_chunk("unavailable", "request_id", f"{request_id!r} was aborted while being admitted")
        queue: asyncio.Queue[RequestDelta] = asyncio.Queue()
        self._queues[request_id] = queue
        if trace_context is not None and tracing.active():
            self._trace_parents[request_id] = trace_context
        self._pumps[request_id] = asyncio.create_task(self._pump(request_id, queue))
        return None

    async def _pump(self, request_id: str, queue: asyncio.Queue[RequestDelta]) -> None:
        assert self.engine is not None
        async for delta in self.engine.stream(request_id):
            if delta.finished and request_id in self._trace_parents:
                spans.engine_spans(
                    self._trace_parents.pop(request_id), request_id, delta.timings, delta.usage, delta.finish_reason
                )
            queue.put_nowait(delta)

    async def next(self, request_id: str, max_tokens: int, max_wait_s: float, keepalive_s: float) -> Chunk:
        """The deltas produced since the last call: waits for one, then gathers more for up to
        ``max_wait_s`` or ``max_tokens`` tokens, whichever comes first.

        With nothing for ``keepalive_s`` (a long prefill, a queue) it returns an empty chunk, so
        every caller up the chain can tell a slow engine from a dead rank by its own timeout.
        """
        queue = self._queues.get(request_id)
        if queue is None:
            return error_chunk("unavailable", "request_id", f"{request_id!r} is not running on this replica")
        try:
            deltas = [await asyncio.wait_for(queue.get(), keepalive_s)]
        except TimeoutError:
            return Chunk()
        loop = asyncio.get_running_loop()
        until = loop.time() + max_wait_s
        num_tokens = len(deltas[0].token_ids)
        while not deltas[-1].finished and num_tokens < max_tokens:
            try:
                deltas.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                left = until - loop.time()
                if left <= 0:
                    break
                try:
                    deltas.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            num_tokens += len(deltas[-1].token_ids)
        chunk = merge_deltas(deltas)
        if chunk.finished:
            self._forget(request_id)
        return chunk

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            await self.engine.abort(request_id)  # frees its KV blocks at once
        if request_id not in self._queues:  # not admitted yet (or already done): remember, briefly
            self._early_aborts[request_id] = None
            while len(self._early_aborts) > 1024:
                self._early_aborts.pop(next(iter(self._early_aborts)))
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._trace_parents.pop(request_id, None)
        queue = self._queues.pop(request_id, None)
        if queue is not None:  # wake a ``next`` still waiting on it (its caller was cancelled)
            queue.put_nowait(RequestDelta(request_id, [], finished=True, finish_reason="abort"))
        pump = self._pumps.pop(request_id, None)
        if pump is not None and not pump.done():
            pump.cancel()

    async def health(self) -> bool:
        return self.engine is not None and await self.engine.health()

    async def stats(self) -> EngineStats:
        assert self.engine is not None
        return await self.engine.stats()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


@ray.remote(max_concurrency=2)  # ``run`` blocks one thread; ``info`` answers on the other
class WorkerRank:
    def __init__(self) -> None:
        self._info: EngineInfo | None = None

    def run(self, config: EngineConfig) -> None:
        run_rank_worker(config, on_ready=self._ready)

    def _ready(self, info: EngineInfo) -> None:
        self._info = info

    def info(self) -> EngineInfo | None:
        """This rank's figures (its share of the experts) once it has joined the group."""
        return self._info
