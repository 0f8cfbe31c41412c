"""Process entry points for the expert-parallel tests (spawned, so module-level and picklable).

Each rank is its own OS process, as in production: rank 0 runs the engine
behind ``EngineClient``; rank 1 runs ``ExpertWorker``. Results come back
through a multiprocessing queue as ``(tag, value)`` pairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from engine.api import create_engine, host_rendezvous
from engine.config import EngineConfig, ParallelConfig
from engine.core.request import SamplingParams
from engine.types import EngineClient


@contextlib.contextmanager
def rendezvous(ep_size: int = 2, timeout_s: float = 30.0) -> Iterator[str]:
    """A loopback rendezvous hosted by the test's process for the block (ranks join with ``store_hosted``)."""
    hosted = host_rendezvous("127.0.0.1", ep_size, timeout_s)
    try:
        yield hosted.init_method
    finally:
        hosted.close()


def join_and_sum(parallel: ParallelConfig, results) -> None:
    """A rank that joins the group, adds its rank + 1 across the group and reports the sum."""
    import torch

    from engine.native.parallel.group import ExpertGroup

    group = ExpertGroup.join(parallel)
    try:
        results.put(("sum", group.all_reduce_sum(torch.tensor([parallel.ep_rank + 1.0])).item()))
    finally:
        group.close()


async def generate_all(engine: EngineClient, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Greedy-generate every prompt concurrently: per prompt, its tokens, chosen logprobs and finish reason."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)

    async def one(i: int, prompt: list[int]) -> dict:
        deltas = [d async for d in engine.generate(f"p{i}", prompt, params)]
        return {
            "tokens": [t for d in deltas for t in d.token_ids],
            "logprobs": [lp.logprob for d in deltas for lp in (d.logprobs or [])],
            "finish_reason": deltas[-1].finish_reason,
        }

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def drive(config: EngineConfig, prompts: list[list[int]], max_tokens: int, results) -> None:
    """Rank 0: generate, report (outputs, info, stats), shut the group down."""
    engine = create_engine(config)
    try:
        outputs = asyncio.run(generate_all(engine, prompts, max_tokens))
        results.put(("outputs", outputs))
        results.put(("info", asyncio.run(engine.info())))
        results.put(("stats", asyncio.run(engine.stats())))
    finally:
        engine.shutdown()
    results.put(("driver_done", None))


def follow(config: EngineConfig, results) -> None:
    """Rank 1..: report what this rank holds, then run rank 0's steps until it stops the group
    (``worker_done``) or the group fails (``worker_error`` with the time it gave up)."""
    from engine.native.parallel.worker import ExpertWorker

    try:
        worker = ExpertWorker(config)
        results.put(("worker_info", worker.info()))
        worker.run()
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(("worker_error", (time.time(), repr(e))))
        return
    results.put(("worker_done", None))


def start_engine(config: EngineConfig, results) -> None:
    """Rank 0 that only starts: ``engine_up``, or ``engine_error`` with what ``create_engine`` raised."""
    try:
        engine = create_engine(config)
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(("engine_error", repr(e)))
        return
    results.put(("engine_up", None))
    engine.shutdown()


def drive_long_request(config: EngineConfig, prompt: list[int], results) -> None:
    """Rank 0 with one long request in flight: say when it streams, then how the stream ended,
    whether the engine still calls itself healthy, and what a new submit gets."""

    async def main() -> None:
        engine = create_engine(config)
        params = SamplingParams(temperature=0, max_tokens=20000, ignore_eos=True)
        await engine.submit("long", prompt, params)
        last = None
        async for delta in engine.stream("long"):
            if last is None:
                results.put(("streaming", time.time()))
            last = delta
        results.put(("stream_end", (time.time(), last.finish_reason)))
        results.put(("healthy", await engine.health()))
        try:
            await engine.submit("after", prompt, params)
            results.put(("submit_after", "accepted"))
        except Exception as e:  # noqa: BLE001 - reported to the test
            results.put(("submit_after", getattr(e, "kind", repr(e))))
        engine.shutdown(timeout=5)

    asyncio.run(main())


def drive_then_idle(config: EngineConfig, prompt: list[int], watch_s: float, results) -> None:
    """Rank 0 serves one request, goes idle (``idle``), then polls ``health()`` for up to
    ``watch_s``: ``unhealthy`` with the time it turned False, or ``still_healthy``."""

    async def main() -> None:
        engine = create_engine(config)
        await generate_all(engine, [prompt], 4)
        results.put(("idle", time.time()))
        deadline = time.time() + watch_s
        while time.time() < deadline:
            if not await engine.health():
                results.put(("unhealthy", time.time()))
                break
            await asyncio.sleep(0.05)
        else:
            results.put(("still_healthy", None))
        engine.shutdown(timeout=5)

    asyncio.run(main())
