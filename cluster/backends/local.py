"""``LocalBackend``: one engine in this process behind the ``Backend`` interface.

For tests, benchmarks and embedding without Ray: the effort decision, the
engine's deltas as chunks, engine errors as chunk errors, and an abort of
the engine request whenever the consumer stops early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

from opentelemetry.trace import Span

from cluster.backends.pipeline import Batching, run_request
from cluster.chunks import engine_error_chunk
from cluster.config import AutoEffortConfig, ReplicaConfig
from cluster.policy.effort import decide_for
from cluster.telemetry import spans, tracing
from cluster.types import Backend, Chunk, Decision, GenerateRequest, ModelInfo, ReplicaStatus, ServedBy
from engine.types import EngineClient, EngineError


class LocalBackend(Backend):
    """Serves ``info.name`` from ``engine``; the engine belongs to the caller, who shuts it down."""

    def __init__(
        self,
        engine: EngineClient,
        info: ModelInfo,
        region: str,
        replica: str = "local-0",
        auto: AutoEffortConfig | None = None,
        heartbeat_s: float = ReplicaConfig.heartbeat_s,
    ):
        self.engine, self.info, self.auto = engine, info, auto or AutoEffortConfig()
        self.batching = Batching(keepalive_s=heartbeat_s)  # a region router's idle limit hears from a long prefill
        self.served_by = ServedBy(region, replica)

    def decide(self, request: GenerateRequest) -> Decision:
        """The router's effort policy; one engine has no queue signal of its own here, so load is 0."""
        decision = decide_for(request, queue_delay_s=0.0, cfg=self.auto, now=time.time())
        return dataclasses.replace(decision, replica=self.served_by.replica)

    async def models(self) -> list[ModelInfo]:
        return [self.info]

    async def ready(self) -> bool:
        return await self.engine.health()

    async def replica_statuses(self, timeout_s: float) -> list[ReplicaStatus]:
        """The one engine's figures, as a replica's status (for the metrics poller)."""
        del timeout_s  # in-process: answers at once
        state = "serving" if await self.engine.health() else "failed"
        return [ReplicaStatus(self.served_by.replica, state, stats=await self.engine.stats(), time=time.time())]

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        attributes = {"levante.replica": self.served_by.replica}
        return spans.traced_hop(spans.LOCAL_BACKEND, request, attributes, lambda span: self._generate(request, span))

    async def _generate(self, request: GenerateRequest, span: Span | None) -> AsyncIterator[Chunk]:
        try:
            decision = self.decide(request)
        except ValueError as e:  # an effort the front door let through: still the caller's field
            yield engine_error_chunk(EngineError.from_value_error(e))
            return
        tracing.set_attributes(span, {"levante.effort": decision.effort, "levante.effort_reason": decision.reason})
        decided = dataclasses.replace(request, reasoning_effort=decision.effort)
        async with contextlib.aclosing(
            run_request(self.engine, decided, self.served_by, span, self.batching)
        ) as chunks:
            first = True
            async for chunk in chunks:
                if first and chunk.error is None:  # the engine took the request
                    chunk.decision = decision
                first = False
                yield chunk
