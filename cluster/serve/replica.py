"""The engine replica deployment: rank 0 of one expert-parallel group, in the replica's own process.

The front door calls ``generate`` through a Serve handle (one Ray hop) and
gets the chunks back on that call's streaming generator: pushed as the engine
makes them, the first at once (time to first token), later ones gathering the
tokens of up to ``stream_chunk_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from opentelemetry.trace import Span, SpanKind
from ray import serve

from cluster.backends.pipeline import Batching, run_request
from cluster.chunks import error_chunk
from cluster.config_loader import config_from_dict
from cluster.serve.ep_group import FAILED, EPGroup
from cluster.serve.routing_hint import RoutingHint
from cluster.telemetry import spans
from cluster.telemetry.hookup import REPLICA, setup_process_tracing
from cluster.types import UNAVAILABLE, Chunk, GenerateRequest, ModelInfo, ReplicaStatus, ServedBy


class EngineReplica:
    async def __init__(self, config: dict[str, Any]):
        self.cfg = config_from_dict(config, source="serve deployment")
        setup_process_tracing(self.cfg, REPLICA)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 -- built outside Serve (tests): name it plainly
            self.replica_id = "replica-0"
        self.served_by = ServedBy(self.cfg.region, self.replica_id)
        r = self.cfg.replica
        # a keepalive well inside every caller's idle limit (a region router's is regions.health.stream_idle_timeout_s),
        # so only a lost replica goes silent that long, however long a prompt takes to prefill
        keepalive_s = min(r.heartbeat_s, r.rank_timeout_s / 2, self.cfg.router.replica_timeout_s / 2)
        self.batching = Batching(r.stream_chunk_tokens, r.stream_chunk_ms / 1000, keepalive_s)
        self.group = EPGroup(self.cfg, name=f"levante-{self.replica_id}")
        await self.group.start()
        self.outstanding = 0

    async def generate(self, request: GenerateRequest, hint: RoutingHint | None = None) -> AsyncIterator[Chunk]:
        # An async generator function itself: Serve streams those. ``hint`` is read by the request
        # router in the caller's process.
        del hint
        attributes = {
            "levante.replica": self.replica_id,
            "levante.ep_size": self.cfg.replica.ep_size,
            "levante.effort": request.reasoning_effort,
        }
        hop = spans.traced_hop(
            spans.REPLICA, request, attributes, lambda span: self._generate(request, span), SpanKind.SERVER
        )
        async with contextlib.aclosing(hop) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _generate(self, request: GenerateRequest, span: Span | None) -> AsyncIterator[Chunk]:
        engine = self.group.engine
        if not self.group.serving or engine is None:
            yield self._unavailable(f"replica {self.replica_id} is {self.group.state}: {self.group.last_failure}")
            return
        self.outstanding += 1
        try:
            async with contextlib.aclosing(run_request(engine, request, self.served_by, span, self.batching)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.outstanding -= 1

    def _unavailable(self, message: str) -> Chunk:
        chunk = error_chunk(UNAVAILABLE, "replica", message)
        chunk.served_by = self.served_by  # so the router can avoid this replica
        return chunk

    async def model_info(self) -> ModelInfo:
        info = self.group.info
        return ModelInfo(self.cfg.model_name, info.max_model_len, info.architecture, info.ep_size)

    async def status(self, hint: RoutingHint | None = None) -> ReplicaStatus:
        """The group's state and the engine's counters; ``hint`` lets a poller steer past replicas that answered."""
        del hint
        engine = self.group.engine
        stats = await engine.stats() if self.group.serving and engine is not None else None
        return ReplicaStatus(
            self.replica_id,
            self.group.state,
            self.group.num_restarts,
            self.group.last_failure,
            self.outstanding,
            stats,
            self.group.info,
            tuple(self.group.rank_infos),
            time.time(),
        )

    async def ready(self, hint: RoutingHint | None = None) -> tuple[str, bool]:
        """(this replica, whether it serves); ``hint`` lets the router steer probes past replicas that said no."""
        del hint
        return self.replica_id, self.group.serving

    async def check_health(self) -> None:
        # A group that is restarting is still this replica's business; only a group that
        # could not come back is reported, so Serve replaces the replica.
        if self.group.state == FAILED:
            raise RuntimeError(f"EP group failed: {self.group.last_failure}")

    async def kill_rank(self, rank: int) -> str:
        """For drills and tests: rank 0 is this process (it exits, as ``crash``); ranks 1.. are killed
        (their gang restart follows)."""
        workers = self.group.worker_actors()
        if not 0 <= rank <= len(workers):
            raise ValueError(f"rank: must be in [0, {len(workers) + 1}), got {rank}")
        if rank == 0:
            return await self.crash()
        ray.kill(workers[rank - 1], no_restart=True)
        return self.replica_id

    async def crash(self) -> str:
        """For drills: this replica's process exits a moment from now, as a crash would (Serve replaces it)."""
        asyncio.get_running_loop().call_later(0.2, os._exit, 1)
        return self.replica_id

    async def __del__(self) -> None:
        await self.group.stop()
