"""The replica router, in the front door's process: each request's reasoning depth and its replica.

Depth comes from ``cluster.policy.effort.decide_effort`` (explicit efforts
capped by the tenant, AUTO by prompt, deadline and current queueing delay).
The replica is chosen by ``LevanteRequestRouter`` inside this process's
handle to the engine deployment, and the request goes straight to it: one
Ray hop, its chunks pushed back on the call's streaming generator. A replica
that answers UNAVAILABLE before its first token (its EP group is restarting)
is avoided for a while and the request goes to another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import Span, SpanKind
from ray.serve.exceptions import BackPressureError

from cluster.config import ClusterConfig
from cluster.policy.effort import decide_for
from cluster.policy.replicas import prefix_key
from cluster.serve.relay import relay
from cluster.serve.routing_hint import RoutingHint
from cluster.telemetry import spans, tracing
from cluster.types import UNAVAILABLE, Chunk, Decision, GenerateRequest, ModelInfo

AVOID_S = 10.0  # how long a replica that said UNAVAILABLE is skipped
READY_PROBE_S = 2.0  # readiness is re-probed at most this often
READY_TIMEOUT_S = 10.0


class QueueDelay:
    """Current queueing delay, as the router sees it: the larger of the oldest request still
    waiting for its first token and a moving average of recent times to first token.

    Time to first token includes prefill, so long prompts raise it too; the average fades
    with a half-life of ``half_life_s`` so a burst does not degrade the quiet that follows.
    """

    def __init__(self, alpha: float = 0.2, half_life_s: float = 5.0):
        self.alpha, self.half_life_s = alpha, half_life_s
        self.average = 0.0
        self._updated = 0.0
        self._waiting: dict[str, float] = {}

    def dispatched(self, request_id: str, now: float) -> None:
        self._waiting[request_id] = now

    def first_chunk(self, request_id: str, now: float) -> None:
        began = self._waiting.pop(request_id, None)
        if began is not None:
            average = self._faded(now)
            self.average, self._updated = average + self.alpha * ((now - began) - average), now

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def current(self, now: float) -> float:
        oldest = min(self._waiting.values(), default=now)
        return max(self._faded(now), now - oldest)

    def _faded(self, now: float) -> float:
        return self.average * 0.5 ** (max(0.0, now - self._updated) / self.half_life_s)


class ReplicaRouter:
    def __init__(self, engine: Any, cfg: ClusterConfig):
        self._engine = engine  # DeploymentHandle to EngineReplica, its request router in this process
        self.cfg = cfg
        self.delay = QueueDelay()
        self._avoid: dict[str, float] = {}  # replica id -> until (monotonic)
        self._ready = False
        self._last_answer = float("-inf")  # when a replica last answered a request (monotonic)
        self._probe: asyncio.Task | None = None
        self._probed = float("-inf")
        self._models: list[ModelInfo] | None = None
        self._generate_handle: Any = None

    def engine(self) -> Any:
        """The handle, its router on the calling event loop (made on first use, inside the loop): Serve's
        default, a router thread of its own, costs a cross-thread hand-off for every streamed chunk."""
        if not self._engine.is_initialized:
            self._engine._init(_run_router_in_separate_loop=False)
        return self._engine

    def _streaming_generate(self) -> Any:
        """``generate`` on the handle, streamed on Serve's gRPC transport: made once (each ``options`` and
        method lookup builds a new handle)."""
        if self._generate_handle is None:
            self._generate_handle = self.engine().options(stream=True, _by_reference=False).generate
        return self._generate_handle

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        attributes = {"levante.requested_effort": request.reasoning_effort}
        return spans.traced_hop(
            spans.ROUTER, request, attributes, lambda span: self._generate(request, span), SpanKind.CLIENT
        )

    async def _generate(self, request: GenerateRequest, span: Span | None) -> AsyncIterator[Chunk]:
        now = time.monotonic()
        decision = decide_for(request, self.delay.current(now), self.cfg.router.auto, time.time())
        tracing.set_attributes(span, {"levante.effort": decision.effort, "levante.effort_reason": decision.reason})
        # the replica's spans are children of this one; the effort is decided from here on
        request = dataclasses.replace(
            request, reasoning_effort=decision.effort, trace_context=tracing.carrier_of(span) or request.trace_context
        )
        key = prefix_key(request.prompt, self.cfg.router.prefix_chars, request.params.cache_salt)
        for attempt in range(2):
            if attempt:  # a new engine id: the first attempt's abort may not have landed yet
                request = dataclasses.replace(request, request_id=f"{request.request_id}#retry")
            hint = RoutingHint(prefix_key=key, avoid=self._avoided(now))
            retry = sent = False
            async with contextlib.aclosing(self._dispatch(request, decision, hint, span)) as chunks:
                async for chunk in chunks:
                    if self._lost(chunk) and attempt == 0 and not sent:  # nothing reached the client: try another
                        retry = True
                        if span is not None:
                            span.add_event(
                                "replica retry",
                                {"levante.replica": chunk.served_by.replica, "levante.reason": chunk.error.message},
                            )
                        break
                    sent = sent or bool(chunk.token_ids)
                    yield chunk
            if not retry:
                return

    def _lost(self, chunk: Chunk) -> bool:
        """True when ``chunk`` says its replica lost the request; that replica is avoided for a while."""
        error = chunk.error
        if error is None or error.code != UNAVAILABLE or error.field not in ("replica", "engine"):
            return False
        if chunk.served_by is None:
            return False
        self._avoid[chunk.served_by.replica] = time.monotonic() + AVOID_S
        return True

    async def _dispatch(
        self, request: GenerateRequest, decision: Decision, hint: RoutingHint, span: Span | None = None
    ) -> AsyncIterator[Chunk]:
        rid = request.request_id
        self.delay.dispatched(rid, time.monotonic())
        stream = self._streaming_generate().remote(request, hint=hint)
        first = waiting = True
        try:  # replicas send keepalives, so silence for replica_timeout_s means a lost replica
            timeout_s, keepalive_s = self.cfg.router.replica_timeout_s, self.cfg.replica.heartbeat_s
            async with contextlib.aclosing(relay(stream, "replica", timeout_s, keepalive_s)) as chunks:
                async for chunk in chunks:
                    if first and (hint.choice is not None or chunk.token_ids or chunk.finished):  # assigned
                        chunk.decision = _decided(decision, hint, chunk)
                        tracing.set_attributes(
                            span,
                            {
                                "levante.replica": chunk.decision.replica,
                                "levante.decision_reason": chunk.decision.reason,
                            },
                        )
                        first = False
                    if waiting and (chunk.token_ids or chunk.finished):  # a keepalive is not an answer
                        self._last_answer = time.monotonic()
                        self.delay.first_chunk(rid, time.monotonic())
                        waiting = False
                    yield chunk
        finally:
            self.delay.forget(rid)

    def _avoided(self, now: float) -> frozenset[str]:
        self._avoid = {r: t for r, t in self._avoid.items() if t > now}
        return frozenset(self._avoid)

    async def models(self) -> list[ModelInfo]:
        if self._models is None:  # asked once: the model does not change under a running app
            self._models = [await asyncio.wait_for(self.engine().model_info.remote(), READY_TIMEOUT_S)]
        return self._models

    async def ready(self) -> bool:
        """Answered from what the router knows, never by waiting behind a busy replica's queue:
        a replica answered recently, or the last probe (re-run in the background) found one ready."""
        now = time.monotonic()
        if now - self._probed > READY_PROBE_S and (self._probe is None or self._probe.done()):
            self._probed = now
            self._probe = asyncio.create_task(self._probe_ready())
            await asyncio.wait([self._probe], timeout=0.5)  # a quick answer is used now
        return self._ready or now - self._last_answer < READY_TIMEOUT_S

    async def _probe_ready(self) -> None:
        """Ask replicas in turn, skipping those that said no, until one is ready (or all said no)."""
        said_no: set[str] = set()
        for _ in range(self.cfg.replica.num_replicas):
            hint = RoutingHint(avoid=frozenset(said_no))
            try:
                replica, serving = await asyncio.wait_for(self.engine().ready.remote(hint=hint), READY_TIMEOUT_S)
            except BackPressureError:
                self._ready = True  # every queue is full: busy, not down
                return
            except Exception:  # noqa: BLE001 -- timeout or no replica: not ready
                break
            if serving:
                self._ready = True
                return
            said_no.add(replica)
        self._ready = False


def _decided(decision: Decision, hint: RoutingHint, first: Chunk) -> Decision:
    """The effort decision plus where the request went and why (the request router's choice rides
    back on the hint: it runs in this process, on the same object)."""
    choice = hint.choice
    replica = first.served_by.replica if first.served_by is not None else choice[0] if choice else ""
    reason = decision.reason
    if choice is not None and choice[0] == replica:
        reason += f"; replica: {choice[1]}"
    return Decision(decision.effort, reason, replica)
