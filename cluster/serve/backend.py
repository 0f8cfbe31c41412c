"""``ServeBackend``: the front door's way into the Serve application of its region."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError

from cluster.chunks import error_chunk
from cluster.types import RESOURCE_EXHAUSTED, UNAVAILABLE, Backend, Chunk, GenerateRequest, ModelInfo


class ServeBackend(Backend):
    def __init__(self, app_name: str, call_timeout_s: float = 30.0):
        self.handle = serve.get_app_handle(app_name)  # the Router deployment
        self.call_timeout_s = call_timeout_s

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        stream = self.handle.options(stream=True).generate.remote(request)
        try:
            async for chunk in stream:
                yield chunk
                if chunk.finished:
                    return
        except BackPressureError:
            yield error_chunk(RESOURCE_EXHAUSTED, "queue", "the router's queue is full; retry later")
        except Exception as e:  # noqa: BLE001 -- a router that died mid-call fails this call only
            yield error_chunk(UNAVAILABLE, "router", f"router call failed: {type(e).__name__}")
        finally:
            stream.cancel()  # cancelled or expired upstream: the replica aborts the engine request

    async def models(self) -> list[ModelInfo]:
        return await asyncio.wait_for(self.handle.models.remote(), self.call_timeout_s)

    async def ready(self) -> bool:
        try:
            return await asyncio.wait_for(self.handle.ready.remote(), self.call_timeout_s)
        except Exception:  # noqa: BLE001 -- not answering is not ready
            return False
