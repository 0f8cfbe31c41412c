"""``run_request`` against a scripted engine: keepalives, deadlines, a broken stream, aborts.

The conformance suite (tests/cluster/test_backend_conformance.py) runs the pipeline on real
engines; these are the paths a real engine rarely takes on cue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from cluster.backends.pipeline import Batching, run_request
from cluster.types import DEADLINE_EXCEEDED, UNAVAILABLE, GenerateRequest, ServedBy
from engine.types import EngineClient, EngineInfo, EngineStats, RequestDelta, SamplingParams

BY = ServedBy("r", "replica-0")


class ScriptedEngine(EngineClient):
    """Sends ``script`` as its stream: a delta, or a number of seconds to wait, or an exception to raise."""

    def __init__(self, script: list) -> None:
        self.script, self.aborted = script, []

    async def submit(self, request_id, prompt, params, resume=None) -> None:
        assert params.reasoning_effort == "none"  # the decided effort reaches the engine

    async def stream(self, request_id: str) -> AsyncIterator[RequestDelta]:
        for step in self.script:
            if isinstance(step, (int, float)):
                await asyncio.sleep(step)
            elif isinstance(step, Exception):
                raise step
            else:
                yield step

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def stats(self) -> EngineStats:
        raise NotImplementedError

    async def health(self) -> bool:
        return True

    async def info(self) -> EngineInfo:
        raise NotImplementedError


def delta(*tokens: int, finished: bool = False) -> RequestDelta:
    return RequestDelta("q", list(tokens), finished=finished, finish_reason="length" if finished else None)


def run(engine: EngineClient, deadline: float | None = None, batching: Batching = Batching()) -> list:
    request = GenerateRequest("q", "m", [1, 2], SamplingParams(), reasoning_effort="none", deadline=deadline)

    async def collect() -> list:
        return [c async for c in run_request(engine, request, BY, batching=batching)]

    return asyncio.run(collect())


def test_first_chunk_names_the_replica_then_tokens_then_the_end():
    engine = ScriptedEngine([delta(5), delta(6), delta(7, finished=True)])
    chunks = run(engine)
    assert chunks[0].served_by == BY and not chunks[0].token_ids
    assert [t for c in chunks for t in c.token_ids] == [5, 6, 7]
    assert chunks[-1].finished and chunks[-1].served_by == BY and engine.aborted == []


def test_a_silent_engine_gets_keepalives_not_an_error():
    engine = ScriptedEngine([0.3, delta(5, finished=True)])
    chunks = run(engine, batching=Batching(keepalive_s=0.05))
    keepalives = [c for c in chunks[1:] if not c.token_ids and not c.finished]
    assert len(keepalives) >= 2 and chunks[-1].token_ids == [5] and chunks[-1].error is None


def test_a_passed_deadline_ends_the_stream_and_aborts_the_engine_request():
    engine = ScriptedEngine([delta(5), 5.0, delta(6, finished=True)])
    chunks = run(engine, deadline=time.time() + 0.2)
    assert chunks[-1].error is not None and chunks[-1].error.code == DEADLINE_EXCEEDED
    assert engine.aborted == ["q"]


def test_a_stream_that_breaks_ends_as_unavailable_and_is_aborted():
    engine = ScriptedEngine([delta(5), RuntimeError("lost")])
    chunks = run(engine)
    assert chunks[-1].error is not None and chunks[-1].error.code == UNAVAILABLE
    assert chunks[-1].served_by == BY  # so the router avoids this replica
    assert engine.aborted == ["q"]


def test_the_first_token_goes_at_once_and_later_chunks_gather_within_the_window():
    engine = ScriptedEngine([delta(1), 0.05, delta(2), 0.01, delta(3), delta(4, finished=True)])
    chunks = run(engine, batching=Batching(max_tokens=16, max_wait_s=0.5))
    assert [c.token_ids for c in chunks[1:]] == [[1], [2, 3, 4]]


def progress(done: int, total: int = 100) -> RequestDelta:
    return RequestDelta("q", [], prompt_tokens_done=done, prompt_tokens_total=total)


def test_prefill_progress_is_coalesced_within_the_window_and_the_first_token_is_not_held():
    # three reports at once, then one after the window, then the first token right behind a report
    script = [progress(10), progress(20), progress(30), 0.3, progress(40), delta(1), delta(2, finished=True)]
    chunks = run(ScriptedEngine(script), batching=Batching(max_tokens=16, max_wait_s=0.1))
    reports = [(c.progress.prompt_tokens_processed, c.progress.prompt_tokens) for c in chunks if c.progress]
    assert reports == [(30, 100), (40, 100)]  # the latest of each window
    assert chunks[-2].token_ids == [1] and chunks[-2].progress is not None  # the first token went with it, at once
    assert chunks[-1].token_ids == [2] and chunks[-1].finished


def test_without_a_window_each_report_apart_goes_out():
    chunks = run(ScriptedEngine([progress(5), 0.05, progress(9), 0.05, delta(1, finished=True)]))
    assert [c.progress.prompt_tokens_processed for c in chunks if c.progress] == [5, 9]
