"""``FailoverBackend``: one stream to the caller, whichever regions it takes to serve it.

Each request tries regions in the order ``order_regions`` gives (preferred, local, then peers by
latency; ejected or unhealthy ones last). A region that fails before the first token is simply
the next one's turn; a stream that breaks mid-way is resumed in the next region from the
tokens already passed on (same prompt, seed and effort), so the caller sees no duplicated and
no missing tokens. RESOURCE_EXHAUSTED spills to the next region; only when every region is full
does the caller get it. Bad requests, refused credentials and deadlines are never retried: they
reach the caller as themselves (``cluster.regions.codes`` holds the rule).

A region resumes a stream only for a caller with the peer role (another region's router): the
tokens a ``resume`` carries are taken on trust. A caller without that role (the client library of
an end client) resumes by replay instead (``replay=True``): the request goes to the next region
again, from the start, with the same seed and effort, and the tokens the caller already has are
checked against the replay's and dropped.

Used twice: by each front door (its own region plus its peers) and by the client library
(``cluster.regions.region_client``: a list of front doors, no local region).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable

from cluster.chunks import error_chunk
from cluster.config import RegionsConfig
from cluster.policy.regions import order_regions
from cluster.regions.codes import fails_over
from cluster.regions.health_book import EJECTED, UNHEALTHY, HealthBook, Transition
from cluster.regions.stalls import Patience
from cluster.telemetry.spans import AnyRouteTrace, RouteTrace, route_trace
from cluster.types import (
    DEADLINE_EXCEEDED,
    FAILED_PRECONDITION,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    Backend,
    Chunk,
    ChunkError,
    Decision,
    FailoverHop,
    GenerateRequest,
    ModelInfo,
)
from engine.types import Resume, ToolCallDelta

SEED_BITS = 62


class _Progress:
    """What the caller has been given so far: enough to resume the stream elsewhere."""

    def __init__(self, resumed: Resume | None, first_token_timeout_s: float | None = None) -> None:
        # a request that is itself a resume (from a client, or a peer) starts from what it carries
        self.token_ids: list[int] = list(resumed.token_ids) if resumed else []
        self.first_token_timeout_s = first_token_timeout_s if not self.token_ids else None
        # the caller's limit on its first token, across every region tried (monotonic); None: none
        self.first_token_by = None if self.first_token_timeout_s is None else time.monotonic() + first_token_timeout_s
        self.text_chars = resumed.text_chars if resumed else 0
        self.reasoning_chars = resumed.reasoning_chars if resumed else 0
        # tool calls the caller has: argument characters per call index (its id and name came first)
        self.call_chars: dict[int, int] = {}
        self.decision: Decision | None = None
        self.failovers: list[FailoverHop] = []

    def resume(self) -> Resume | None:
        if not self.token_ids:
            return None
        return Resume(tuple(self.token_ids), self.text_chars, self.reasoning_chars)

    def pass_on(self, chunk: Chunk) -> Chunk:
        if chunk.token_ids or chunk.finished:
            self.first_token_by = None  # answered: the first token's limit is met
        self.token_ids.extend(chunk.token_ids)
        self.text_chars += len(chunk.text)
        self.reasoning_chars += len(chunk.reasoning_text)
        for call in chunk.tool_calls or ():
            self.call_chars[call.index] = self.call_chars.get(call.index, 0) + len(call.arguments)
        if chunk.decision is not None:
            # the caller keeps the first decision: a resumed region was told to use its effort
            self.decision = self.decision or chunk.decision
            chunk.decision = self.decision
        if chunk.finished and self.failovers:  # ours first: the region that served may report its own too
            chunk.failovers = self.failovers + (chunk.failovers or [])
        return chunk


@dataclasses.dataclass
class _Outcome:
    done: bool = False  # the caller got its final chunk (an answer or an error not worth retrying)
    reason: str = ""  # why this region was left
    error: ChunkError | None = None


def _said(error: ChunkError) -> str:
    return f"{error.origin}: {error.message}" if error.origin else error.message


def _reason(error: ChunkError) -> str:
    """Why a region was left: the code once, then who said it, then what it said."""
    return f"{error.code}: {_said(error)}"


def _left(request: GenerateRequest, progress: _Progress) -> list[float]:
    """Seconds left before the caller's limits: its deadline, and its first token's (while it waits)."""
    left = []
    if request.deadline is not None:
        left.append(request.deadline - time.time())
    if progress.first_token_by is not None:
        left.append(progress.first_token_by - time.monotonic())
    return left


def _first_token_late(progress: _Progress) -> Chunk:
    return error_chunk(
        DEADLINE_EXCEEDED,
        "first_token_timeout_s",
        f"no first token within {progress.first_token_timeout_s:g}s (the tenant's limit); the request was stopped",
    )


class _Replay:
    """Drops from a replayed stream what the caller already has, checking its tokens match."""

    def __init__(self, progress: _Progress, region: str) -> None:
        self.expected = list(progress.token_ids)
        self.tokens, self.text, self.reasoning = len(self.expected), progress.text_chars, progress.reasoning_chars
        self.seen = 0  # replayed tokens checked so far
        self.region = region
        self.calls = dict(progress.call_chars)  # argument characters per call still to drop

    def _trim_calls(self, calls: list[ToolCallDelta] | None) -> list[ToolCallDelta] | None:
        """The replay's tool-call deltas less what the caller has: a known call keeps the id it was sent first."""
        if not calls or not self.calls:
            return calls
        out = []
        for c in calls:
            if c.index not in self.calls:
                out.append(c)
                continue
            skip = min(self.calls[c.index], len(c.arguments))
            self.calls[c.index] -= skip
            if c.arguments[skip:]:
                out.append(ToolCallDelta(c.index, arguments=c.arguments[skip:]))
        return out or None

    def trim(self, chunk: Chunk) -> Chunk:
        """The chunk less the part the caller has; an error chunk when the replay differs."""
        k = min(len(chunk.token_ids), self.tokens)
        if chunk.token_ids[:k] != self.expected[self.seen : self.seen + k]:
            at = self.seen + next(i for i in range(k) if chunk.token_ids[i] != self.expected[self.seen + i])
            return error_chunk(
                FAILED_PRECONDITION,
                "resume",
                f"the replay in {self.region} differs from the tokens already sent, at token {at}; "
                f"the stream cannot go on unchanged (retry the request)",
            )
        t, r = min(len(chunk.text), self.text), min(len(chunk.reasoning_text), self.reasoning)
        self.tokens, self.text, self.reasoning, self.seen = (
            self.tokens - k,
            self.text - t,
            self.reasoning - r,
            self.seen + k,
        )
        calls = self._trim_calls(chunk.tool_calls)
        if not (k or t or r) and calls is chunk.tool_calls:
            return chunk
        logprobs = chunk.logprobs[k:] if chunk.logprobs is not None else None
        return dataclasses.replace(
            chunk,
            token_ids=chunk.token_ids[k:],
            text=chunk.text[t:],
            reasoning_text=chunk.reasoning_text[r:],
            logprobs=logprobs,
            tool_calls=calls,
        )


async def _replayed(chunks: AsyncIterator[Chunk], replay: _Replay) -> AsyncIterator[Chunk]:
    async with contextlib.aclosing(chunks) as stream:  # type: ignore[type-var]
        async for chunk in stream:
            if chunk.error is not None:
                yield chunk
                return
            chunk = replay.trim(chunk)
            yield chunk
            if chunk.finished:
                return


def _with_seed(request: GenerateRequest) -> GenerateRequest:
    """A sampled request gets a seed now, so a resumed stream draws from the same generator."""
    params = request.params
    if params.greedy or params.seed is not None:
        return request
    return dataclasses.replace(request, params=dataclasses.replace(params, seed=random.getrandbits(SEED_BITS)))


class FailoverBackend(Backend):
    def __init__(
        self,
        members: dict[str, Backend],
        book: HealthBook,
        cfg: RegionsConfig,
        local: str | None = None,
        by_latency: bool = True,
        replay: bool = False,
    ):
        self.members, self.book, self.cfg, self.local = members, book, cfg, local
        self.by_latency = by_latency  # False: the members' own order (a client's list of endpoints)
        self.replay = replay  # True: resume a broken stream by replay (a caller without the peer role)
        self.failover_listeners: list[Callable[[FailoverHop], None]] = []  # metrics (cluster/telemetry)
        self._judged_down: dict[str, set[Callable[[], None]]] = collections.defaultdict(set)  # waits to cut short
        book.listeners.append(self._on_transition)

    def _on_transition(self, t: Transition) -> None:
        if t.state in (UNHEALTHY, EJECTED):
            for cut_short in list(self._judged_down.get(t.region, ())):
                cut_short()

    @property
    def fails_over(self) -> bool:
        return len(self.members) > 1

    def order(self, preferred: str | None) -> list[str]:
        regions = [self.book.regions[name] for name in self.members]
        ranked = order_regions(regions, self.book.clock(), (preferred, self.local), self.by_latency)
        return ranked[: self.cfg.max_attempts]

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        trace = route_trace(request)  # with tracing on: a span for the route and one per region attempt
        chunks = self._route(request, trace)
        return trace.wrap(chunks) if isinstance(trace, RouteTrace) else chunks

    async def _route(self, request: GenerateRequest, trace: AnyRouteTrace) -> AsyncIterator[Chunk]:
        if request.forwarded_from is not None and self.local is not None:
            # a peer's router already chose us: serve here or fail, so requests never bounce between regions;
            # the same liveness test holds, so a silent replica here fails the call and the peer moves on
            outcome = _Outcome()
            attempt = trace.attempt(self.local, 0, request)
            async with contextlib.aclosing(self._attempt(self.local, attempt, _Progress(None), outcome)) as chunks:
                async for chunk in chunks:
                    yield chunk
            if not outcome.done and outcome.error is not None:
                yield Chunk(finished=True, error=outcome.error)
            return
        request = _with_seed(request)
        progress = _Progress(request.resume, request.first_token_timeout_s)
        last: ChunkError | None = None
        full: ChunkError | None = None  # the last RESOURCE_EXHAUSTED: a busy region, not a failed one
        for index, region in enumerate(self.order(request.preferred_region)):
            if request.deadline is not None and time.time() >= request.deadline:
                break
            outcome = _Outcome()
            attempt = trace.attempt(region, index, self._for_attempt(request, progress, self.replay))
            async with contextlib.aclosing(self._attempt(region, attempt, progress, outcome)) as chunks:
                async for chunk in chunks:
                    yield chunk
            if outcome.done:
                return
            if outcome.error is None:  # the caller's own limit on its first token passed: no region to blame
                yield _first_token_late(progress)
                return
            hop = FailoverHop(region, outcome.reason, len(progress.token_ids))
            progress.failovers.append(hop)
            trace.failover(hop)
            for listener in self.failover_listeners:
                listener(hop)
            last = outcome.error
            if last.code == RESOURCE_EXHAUSTED:
                full = last
        if last is not None and request.deadline is not None and time.time() >= request.deadline:
            yield error_chunk(DEADLINE_EXCEEDED, "deadline", "passed while failing over between regions")
        elif last is not None and last.code == RESOURCE_EXHAUSTED:
            yield error_chunk(RESOURCE_EXHAUSTED, last.field, f"every region is full: {_said(last)}")
        elif full is not None:  # busy in one region, down in the others: a retry later may succeed
            yield error_chunk(RESOURCE_EXHAUSTED, full.field, f"no region has room: {_said(full)}")
        else:
            tried = ", ".join(f"{h.from_region} ({h.reason})" for h in progress.failovers) or "none"
            yield error_chunk(UNAVAILABLE, "regions", f"no region could serve this request; tried {tried}")

    @staticmethod
    def _for_attempt(request: GenerateRequest, progress: _Progress, replay: bool) -> GenerateRequest:
        resume = progress.resume()
        if resume is None:
            return request
        # the effort the first region chose, so the next one renders the same prompt and budget
        effort = progress.decision.effort if progress.decision is not None else request.reasoning_effort
        return dataclasses.replace(request, resume=None if replay else resume, reasoning_effort=effort)

    async def _attempt(
        self, region: str, request: GenerateRequest, progress: _Progress, outcome: _Outcome
    ) -> AsyncIterator[Chunk]:
        """One region's try: yields what it produced; ``outcome`` says whether to go on elsewhere.

        The liveness test is the idle limit: no chunk at all (heartbeats included) for
        ``stream_idle_timeout_s``, before or after the first token. A slow first token is not a
        failure: a region that heartbeats while it prefills is alive, however long the prompt.
        """
        limit = self.cfg.health.stream_idle_timeout_s
        source = self.members[region].generate(request)
        if self.replay and progress.token_ids:
            source = _replayed(source, _Replay(progress, region))
        async with contextlib.aclosing(source) as chunks:
            while True:
                left = _left(request, progress)  # the caller's limits: stalls of this loop do not stretch them
                cap = asyncio.get_running_loop().time() + max(min(left), 0.0) if left else None
                try:
                    chunk = await self._next(region, chunks, limit, cap)
                except TimeoutError as silent:
                    if request.deadline is not None and time.time() >= request.deadline:  # the caller's limit
                        outcome.done = True
                        yield error_chunk(DEADLINE_EXCEEDED, "deadline", "passed before the stream finished")
                        return
                    if progress.first_token_by is not None and time.monotonic() >= progress.first_token_by:
                        return  # the caller's limit on its first token: the route ends it, no region is blamed
                    judged = silent.args[0] if silent.args else f"timeout: no chunk or heartbeat within {limit:g}s"
                    self._leave(region, outcome, judged)
                    return
                if chunk is None:
                    self._leave(region, outcome, "unavailable: the stream ended before its final chunk")
                    return
                if chunk.error is not None:
                    if fails_over(chunk.error.code, self.cfg.spill_on_overload):
                        self._leave(region, outcome, _reason(chunk.error), chunk.error)
                        return
                    outcome.done = True
                    yield chunk
                    return
                yield progress.pass_on(chunk)
                if chunk.finished:
                    outcome.done = True
                    self.book.on_success(region)
                    return

    async def _next(self, region: str, chunks: AsyncIterator[Chunk], idle_s: float, cap: float | None) -> Chunk | None:
        """The next chunk (None at the end), or TimeoutError after ``idle_s`` of silence (not counting
        stalls of this loop) or at ``cap`` (loop time). Once the region's checks call it down (unhealthy
        or ejected) and another region takes traffic, its silence may last only as long as the checks
        took to judge it, so a frozen region's streams leave when it is judged instead of a whole idle
        limit later."""
        judged = ""
        try:
            # in this task: Python 3.11's wait_for loses a cancel that lands as a chunk arrives,
            # and the caller's cancelled stream would then run on to its end in the engine
            async with asyncio.timeout(None) as limit:
                patience = Patience(self.book.stalls, limit, idle_s, cap)

                def cut_short() -> None:
                    nonlocal judged
                    if limit.expired() or self._down_patience() >= patience.patience_s:
                        return  # already due (the checks may judge it as the wait ends)
                    if any(self.book.available(n) for n in self.members if n != region):
                        health = self.book.regions[region]
                        judged = f"{health.state(self.book.clock())}: {health.reason}"
                        patience.shorten(self._down_patience())

                if not self.book.available(region):
                    cut_short()
                self._judged_down[region].add(cut_short)
                try:
                    return await anext(chunks, None)
                finally:
                    self._judged_down[region].discard(cut_short)
                    patience.cancel()
        except TimeoutError:
            raise TimeoutError(judged) if judged else TimeoutError() from None

    def _down_patience(self) -> float:
        health = self.cfg.health
        return min(health.stream_idle_timeout_s, health.timeout_s * health.unhealthy_threshold)

    def _leave(self, region: str, outcome: _Outcome, reason: str, error: ChunkError | None = None) -> None:
        outcome.reason = reason
        outcome.error = error or ChunkError(UNAVAILABLE, "region", f"{region}: {reason}")
        if error is None or error.code == UNAVAILABLE:  # a full region is busy, not sick
            self.book.on_failure(region, reason)

    # ---- Backend --------------------------------------------------------------------------------

    async def models(self) -> list[ModelInfo]:
        for region in self.order(None):
            try:
                return await self.members[region].models()
            except Exception:  # noqa: BLE001 -- the next region may answer
                continue
        raise LookupError("regions: no region answered ListModels")

    async def ready(self) -> bool:
        """This region's own readiness (what its health service reports to peers and load balancers)."""
        if self.local is not None:
            return await self.members[self.local].ready()
        return any(self.book.available(name) for name in self.members)
