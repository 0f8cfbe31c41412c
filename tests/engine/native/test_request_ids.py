"""Request ids at the AsyncEngine: a twin never disturbs the request that holds its id, and a submit
cancelled during admission leaves no request running under its id."""

from __future__ import annotations

import asyncio

import pytest

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.core.request import SamplingParams
from engine.native.async_engine import AsyncEngine
from engine.native.builder import build_engine_core
from engine.types import EngineError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny("mistral", seed=3, out=str(tmp_path_factory.mktemp("tiny")))
    eng = AsyncEngine(
        build_engine_core(EngineConfig(model=ModelConfig(model=path), cache=CacheConfig(num_blocks=64, block_size=8)))
    )
    yield eng
    eng.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def drain(engine: AsyncEngine, rid: str) -> list:
    return [d async for d in engine.stream(rid)]


def test_a_twin_is_refused_and_the_original_streams_whole(engine):
    async def main():
        await engine.submit("x", [3, 4, 5, 6], GREEDY)
        with pytest.raises(EngineError) as twin:
            await engine.submit("x", [3, 4, 5, 6], GREEDY)
        return twin.value, await drain(engine, "x")

    twin, deltas = run(main())
    assert twin.field == "request_id"
    assert sum(len(d.token_ids) for d in deltas) == 24 and deltas[-1].finish_reason == "length"


def test_a_submit_cancelled_during_admission_leaves_nothing_running(engine):
    """Its id is refused until its abort lands (a step at most), then serves a new request whole."""

    async def main():
        before = (await engine.stats()).num_generated_tokens
        long = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
        first = asyncio.create_task(engine.submit("gone", [3, 4, 5], long))
        await asyncio.sleep(0)  # in the engine's inbox now, waiting for admission
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        for _ in range(500):
            try:
                await engine.submit("gone", [7, 8, 9], GREEDY)
                break
            except EngineError as e:
                assert e.field == "request_id"
                await asyncio.sleep(0.01)
        deltas = await drain(engine, "gone")
        return deltas, (await engine.stats()).num_generated_tokens - before

    deltas, generated = run(main())
    assert sum(len(d.token_ids) for d in deltas) == 24 and deltas[-1].finish_reason == "length"
    assert run(engine.stats()).num_running == 0
    assert generated - 24 < 10, f"the cancelled request ran on for {generated - 24} tokens"
