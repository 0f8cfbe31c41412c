"""AsyncEngine behind the EngineClient boundary, on a tiny Mistral checkpoint."""

from __future__ import annotations

import asyncio

import pytest

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.core.request import SamplingParams
from engine.native.async_engine import AsyncEngine
from engine.native.builder import build_engine_core
from engine.types import EngineClient, EngineError


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


async def collect(eng: EngineClient, rid: str, prompt, params):
    return [d async for d in eng.generate(rid, prompt, params)]


def test_streams_concurrent_requests_to_completion(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        return await asyncio.gather(*(collect(engine, f"r{i}", [5 + i, 6, 7, 8], params) for i in range(6)))

    results = run(main())
    for deltas in results:
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert sum(len(d.token_ids) for d in deltas) == 12
        assert deltas[-1].usage.completion_tokens == 12
    assert run(engine.stats()).num_used_blocks == 0


def test_abort_mid_stream_frees_blocks(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
        await engine.submit("long", list(range(3, 40)), params)
        seen = []
        async for d in engine.stream("long"):
            seen.append(d)
            if len(seen) == 3:
                await engine.abort("long")
        return seen

    seen = run(main())
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    for _ in range(50):  # stats are refreshed by the engine thread after each step
        if run(engine.stats()).num_used_blocks == 0:
            break
        run(asyncio.sleep(0.02))
    assert run(engine.stats()).num_used_blocks == 0


def test_consumer_that_stops_early_aborts_the_request(engine):
    async def main():
        agen = engine.generate("early", [3, 4, 5], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()  # the finally clause aborts
        await asyncio.sleep(0.2)
        return await engine.stats()

    assert run(main()).num_running == 0


@pytest.mark.parametrize(
    "prompt,field",
    [([], "prompt"), ([10**9], "prompt"), ("text but no tokenizer", "prompt"), (list(range(3, 3000)), "prompt")],
)
def test_bad_input_is_a_named_error_and_engine_stays_up(engine, prompt, field):
    with pytest.raises(EngineError) as err:
        run(engine.submit("bad", prompt, SamplingParams()))
    assert err.value.field == field
    assert run(engine.health())
    # and the next good request is served
    deltas = run(collect(engine, "after-bad", [3, 4], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)))
    assert deltas[-1].finished


def test_unknown_effort_rejected_naming_the_field():
    with pytest.raises(ValueError, match="^reasoning_effort"):
        SamplingParams(reasoning_effort="extreme")
