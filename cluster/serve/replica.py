"""The engine replica deployment: one expert-parallel group behind ``generate``.

Streams chunks, not tokens: after the first chunk (sent as soon as it
exists, for time to first token) each pull from rank 0 gathers the tokens of
up to ``stream_chunk_ms``, so a Serve hop carries many tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import Span, SpanKind
from ray import serve

from cluster.chunks import error_chunk
from cluster.config_loader import config_from_dict
from cluster.serve.ep_group import FAILED, EPGroup
from cluster.serve.routing import RoutingHint
from cluster.telemetry import spans, tracing
from cluster.telemetry.hookup import REPLICA, setup_process_tracing
from cluster.types import UNAVAILABLE, Chunk, Decision, GenerateRequest, ModelInfo, ServedBy


class EngineReplica:
    async def __init__(self, config: dict[str, Any]):
        self.cfg = config_from_dict(config, source="serve deployment")
        setup_process_tracing(self.cfg, REPLICA)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 -- built outside Serve (tests): name it plainly
            self.replica_id = "replica-0"
        self.served_by = ServedBy(self.cfg.region, self.replica_id)
        self.group = EPGroup(self.cfg, name=f"levante-{self.replica_id}")
        await self.group.start()
        self.outstanding = 0

    async def generate(
        self, request: GenerateRequest, decision: Decision, hint: RoutingHint | None = None
    ) -> AsyncIterator[Chunk]:
        del hint  # read by the request router in the caller's process; nothing to do here
        span = tracing.start_span(
            spans.REPLICA,
            request.trace_context,
            SpanKind.SERVER,
            {
                "levante.request_id": request.request_id,
                "levante.replica": self.replica_id,
                "levante.ep_size": self.cfg.replica.ep_size,
                "levante.effort": decision.effort,
            },
        )
        async with contextlib.aclosing(spans.traced(span, self._generate(request, decision, span))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _generate(self, request: GenerateRequest, decision: Decision, span: Span | None) -> AsyncIterator[Chunk]:
        if not self.group.serving:
            yield self._unavailable(f"replica {self.replica_id} is {self.group.state}: {self.group.last_failure}")
            return
        driver, cfg = self.group.driver, self.cfg.replica
        rid = request.request_id
        params = dataclasses.replace(request.params, reasoning_effort=decision.effort)
        self.outstanding += 1
        finished = False
        try:
            # rank 0 makes the engine's stage spans under this replica's span
            submitted = driver.submit.remote(rid, request.prompt, params, request.resume, tracing.carrier_of(span))
            error = await asyncio.wait_for(submitted, cfg.rank_timeout_s)
            if error is not None:
                finished = True
                yield error
                return
            wait_s = 0.0  # the first chunk goes out at once
            first = True
            while not finished:
                pending = driver.next.remote(rid, cfg.stream_chunk_tokens, wait_s, cfg.rank_timeout_s / 2)
                chunk: Chunk = await asyncio.wait_for(pending, cfg.rank_timeout_s)  # a keepalive comes sooner
                wait_s = cfg.stream_chunk_ms / 1000
                finished = chunk.finished
                # the first tells the router where it landed, the last tells the client, an error whom to avoid
                if first or finished:
                    chunk.served_by, first = self.served_by, False
                yield chunk
        except Exception as e:  # noqa: BLE001 -- a lost or stuck rank: fail this request, not the replica
            yield self._unavailable(f"replica {self.replica_id} lost the request: {type(e).__name__}")
        finally:
            self.outstanding -= 1
            if not finished and self.group.driver is not None:
                self.group.driver.abort.remote(rid)  # cancelled or expired: free its KV blocks now

    def _unavailable(self, message: str) -> Chunk:
        chunk = error_chunk(UNAVAILABLE, "replica", message)
        chunk.served_by = self.served_by  # so the router can avoid this replica
        return chunk

    async def model_info(self) -> ModelInfo:
        info = self.group.info
        return ModelInfo(self.cfg.model_name, info.max_model_len, info.architecture, info.ep_size)

    async def status(self, hint: RoutingHint | None = None) -> dict[str, Any]:
        """For operators, metrics and tests: the group's state and the engine's counters.

        ``hint`` lets a poller steer its asks past replicas that answered already."""
        del hint
        stats = None
        if self.group.serving:
            stats = await asyncio.wait_for(self.group.driver.stats.remote(), self.cfg.replica.rank_timeout_s)
        return {
            "replica": self.replica_id,
            "state": self.group.state,
            "restarts": self.group.num_restarts,
            "last_failure": self.group.last_failure,
            "outstanding": self.outstanding,
            "stats": stats,
            "info": self.group.info,
            "ranks": self.group.rank_infos,
            "time": time.time(),
        }

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
        """For drills and tests: kill one rank's actor (its gang restart follows)."""
        import ray

        actors = self.group.rank_actors()
        if not 0 <= rank < len(actors):
            raise ValueError(f"rank: must be in [0, {len(actors)}), got {rank}")
        ray.kill(actors[rank], no_restart=True)
        return self.replica_id

    async def crash(self) -> str:
        """For drills: this replica's process exits a moment from now, as a crash would (Serve replaces it)."""
        asyncio.get_running_loop().call_later(0.2, os._exit, 1)
        return self.replica_id

    async def __del__(self) -> None:
        await self.group.stop()
