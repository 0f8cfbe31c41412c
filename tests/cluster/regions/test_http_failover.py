"""A region failover in the middle of an HTTP stream: the ``openai`` client reads one SSE stream, the
first tokens from eu, the rest from us (eu's router resumes the stream there), none lost or repeated."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from cluster.chunks import error_chunk
from cluster.types import UNAVAILABLE, Backend, Chunk, GenerateRequest, ModelInfo

from ..frontdoor.harness import MODEL
from ..frontdoor.http.harness import anonymous
from .test_two_regions import Regions

pytestmark = pytest.mark.e2e
BREAK_AT = 8
REQUEST = dict(
    model=MODEL,
    prompt="Tell me a story",
    max_tokens=40,
    temperature=1.0,
    top_p=0.9,
    seed=1234,
    logprobs=0,  # each token comes with its id (token_id:<id>): the stream is compared token by token
    stream=True,
    extra_body={"reasoning_effort": "none"},
)


class BreaksOnceSeen(Backend):
    """eu's own replica: after ``BREAK_AT`` tokens it waits until the HTTP client has read some of them,
    then loses the stream (a replica dying mid-stream)."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.seen = asyncio.Event()
        self.broke = 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        sent = 0
        async with contextlib.aclosing(self.inner.generate(request)) as chunks:
            async for chunk in chunks:
                if sent >= BREAK_AT:
                    await self.seen.wait()
                    self.broke += 1
                    yield error_chunk(UNAVAILABLE, "replica", "replica lost (test)")
                    return
                sent += len(chunk.token_ids)
                yield chunk

    async def models(self) -> list[ModelInfo]:
        return await self.inner.models()

    async def ready(self) -> bool:
        return True


def token_ids(events) -> list[str]:
    return [t for e in events for t in (e.choices[0].logprobs.tokens if e.choices[0].logprobs else [])]


def test_an_http_stream_survives_its_regions_replica_dying_with_nothing_lost_or_repeated(loop, engines):
    wrapped: list[BreaksOnceSeen] = []
    regions = Regions(loop, engines, wrap_eu=lambda local: wrapped.append(BreaksOnceSeen(local)) or wrapped[0])
    try:
        reference = list(anonymous(regions.doors["us"]).completions.create(**REQUEST))
        events = []
        for event in anonymous(regions.doors["eu"]).completions.create(**REQUEST):
            events.append(event)
            if event.choices and event.choices[0].text and not wrapped[0].seen.is_set():
                loop.call(wrapped[0].seen.set)  # the client holds eu's first tokens: now eu's replica dies
    finally:
        regions.close()
    assert wrapped[0].broke == 1
    assert len(token_ids(reference)) == 40
    assert token_ids(events) == token_ids(reference)  # same seed: the same tokens, none twice, none missing
    assert "".join(e.choices[0].text for e in events) == "".join(e.choices[0].text for e in reference)
    assert events[-1].choices[0].finish_reason == "length" and len({e.id for e in events}) == 1
