"""vLLM behind ``LLM``'s synchronous API: the engine lives on a private event loop in a thread."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from engine.config import EngineConfig
from engine.core.request import SamplingParams
from engine.types import EngineStats, Prompt, RequestDelta, RequestOutput, Resume
from engine.vllm.engine import VllmEngine

T = TypeVar("T")


class OfflineVllm:
    def __init__(self, config: EngineConfig):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="levante-vllm-loop", daemon=True)
        self._thread.start()
        self._ids = itertools.count()
        self.engine: VllmEngine = self._run(self._build(config))

    @staticmethod
    async def _build(config: EngineConfig) -> VllmEngine:
        return VllmEngine(config)  # on the loop, so vLLM's output handler runs there

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        async def one(prompt: Prompt, sp: SamplingParams) -> RequestOutput:
            rid = f"llm-{next(self._ids)}"
            async for _ in self.engine.generate(rid, prompt, sp):
                pass
            return self.engine.finished.pop(rid)

        async def all_of() -> list[RequestOutput]:
            return list(await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params))))

        return self._run(all_of())

    def stream(self, prompt: Prompt, params: SamplingParams, resume: Resume | None) -> Iterator[RequestDelta]:
        rid = f"llm-{next(self._ids)}"
        self._run(self.engine.submit(rid, prompt, params, resume=resume))
        deltas = self.engine.stream(rid)
        finished = False
        try:
            while not finished:
                delta = self._run(deltas.__anext__())
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                self._run(self.engine.abort(rid))
            self.engine.finished.pop(rid, None)

    def stats(self) -> EngineStats:
        return self._run(self.engine.stats())

    def close(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
