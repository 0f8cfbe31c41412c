"""``relay`` over a scripted stand-in for a Serve streaming response: keepalives while the call waits
for its callee (queued in the handle), none once the callee speaks, and the idle limit still holds."""

from __future__ import annotations

import asyncio

from cluster.serve.relay import relay
from cluster.types import UNAVAILABLE, Chunk


class _Stream:
    """Chunks handed out one ``__anext__`` at a time, each only once the test releases it."""

    def __init__(self, chunks: list[Chunk]):
        self.chunks = chunks
        self.released = asyncio.Semaphore(0)
        self.cancelled = False

    async def __anext__(self) -> Chunk:
        await self.released.acquire()
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


def _is_keepalive(chunk: Chunk) -> bool:
    return chunk == Chunk()


def test_a_call_waiting_for_its_callee_keeps_its_caller_posted_until_the_first_chunk():
    async def scenario() -> list[Chunk]:
        answer, final = Chunk(token_ids=[7]), Chunk(token_ids=[8], finished=True)
        stream, seen = _Stream([answer, final]), []
        async for chunk in relay(stream, "replica", idle_timeout_s=30, queued_keepalive_s=0.05):
            seen.append(chunk)
            if len(seen) == 3:  # two keepalives while queued: now the replica takes the call
                stream.released.release()
            if chunk is answer:  # after the first chunk the callee's silence is not ours to cover
                asyncio.get_running_loop().call_later(0.3, stream.released.release)
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 30))
    *queued, answer, final = seen  # a stalled loop may add a keepalive before the answer, never after it
    assert len(queued) >= 3 and all(_is_keepalive(c) for c in queued)
    assert (answer.token_ids, final.token_ids, final.finished) == ([7], [8], True)


def test_a_callee_that_never_answers_still_fails_the_call_after_the_idle_limit():
    async def scenario() -> tuple[list[Chunk], _Stream]:
        stream = _Stream([Chunk(token_ids=[7])])
        seen = [c async for c in relay(stream, "replica", idle_timeout_s=0.3, queued_keepalive_s=0.05)]
        return seen, stream

    seen, stream = asyncio.run(asyncio.wait_for(scenario(), 30))
    *keepalives, last = seen
    assert keepalives and all(_is_keepalive(c) for c in keepalives)
    assert last.error is not None and last.error.code == UNAVAILABLE and last.error.field == "replica"
    assert stream.cancelled, "the call left behind was not cancelled"


def test_without_a_queued_keepalive_nothing_is_made_up():
    async def scenario() -> list[Chunk]:
        stream = _Stream([Chunk(token_ids=[7], finished=True)])
        asyncio.get_running_loop().call_later(0.2, stream.released.release)
        return [c async for c in relay(stream, "replica", idle_timeout_s=30)]

    seen = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [c.token_ids for c in seen] == [[7]]
