"""The three ways the serving benchmark reaches the same model.

- ``InProcessPath``: ``engine.api.create_engine`` in this process and its
  ``generate()`` iterator; with ``replica.ep_size > 1`` this process is rank 0
  and ranks 1.. are spawned OS processes, so the engine does the same
  expert-parallel work as in the cluster, minus Serve.
- ``GrpcPath``: a grpc.aio ``levante.v1`` client; pointed at the Levante
  front door, or (with the ``application`` metadata) at Serve's gRPC proxy.

Every request is greedy, ignores EOS (so each yields exactly ``max_tokens``)
and asks for reasoning effort ``none``, so no path differs in what it asks.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import Sequence
from typing import Any

import grpc

from cluster.config import ClusterConfig
from cluster.config_loader import engine_config_for_rank
from cluster.ops.bench.timing import RequestTiming
from engine.api import Rendezvous, create_engine, host_rendezvous, run_expert_worker
from engine.types import EngineClient, SamplingParams
from levante.v1 import inference_pb2 as pb
from levante.v1 import inference_pb2_grpc as pb_grpc


class InProcessPath:
    name = "in-process"

    def __init__(self, cfg: ClusterConfig, timeout_s: float):
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.engine: EngineClient | None = None
        self._followers: list[Any] = []
        self.rendezvous: Rendezvous | None = None  # the EP group's, hosted here

    def start(self) -> None:
        """Blocks until the model is loaded on every rank."""
        ep = self.cfg.replica.ep_size
        if ep == 1:
            self.engine = create_engine(self.cfg.engine)
            return
        # bound now on a port the kernel picks, before any rank starts: no other process can take it
        self.rendezvous = host_rendezvous("127.0.0.1", ep, self.cfg.engine.parallel.timeout_s)
        init = self.rendezvous.init_method
        configs = [
            engine_config_for_rank(self.cfg, r, init_method=init, store_hosted=True, backend="gloo") for r in range(ep)
        ]
        ctx = mp.get_context("spawn")  # a fresh interpreter: no Ray or grpc state inherited
        for c in configs[1:]:
            p = ctx.Process(target=run_expert_worker, args=(c,), name=f"bench-ep-rank{c.parallel.ep_rank}", daemon=True)
            p.start()
            self._followers.append(p)
        self.engine = create_engine(configs[0])  # joins the followers (bounded by parallel.timeout_s)

    async def vocab_size(self) -> int:
        assert self.engine is not None
        return (await self.engine.info()).vocab_size

    async def generate(self, request_id: str, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
        assert self.engine is not None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, reasoning_effort="none")
        timing = RequestTiming()

        async def consume() -> None:
            async for delta in self.engine.generate(request_id, list(prompt), params):
                timing.got(delta.token_ids)

        await asyncio.wait_for(consume(), self.timeout_s)
        timing.finish()
        return timing

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()  # rank 0 tells the followers to leave the group
            self.engine = None
        for p in self._followers:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        self._followers = []
        if self.rendezvous is not None:
            self.rendezvous.close()
            self.rendezvous = None


class GrpcPath:
    def __init__(self, name: str, target: str, timeout_s: float, metadata: tuple[tuple[str, str], ...] = ()):
        self.name = name
        self.target = target
        self.timeout_s = timeout_s
        self.metadata = metadata
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.InferenceStub | None = None

    async def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = pb_grpc.InferenceStub(self._channel)

    async def generate(self, request_id: str, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
        assert self._stub is not None, "open() first"
        req = pb.GenerateRequest(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            request_id=request_id,
            reasoning_effort=pb.REASONING_EFFORT_NONE,
        )
        req.prompt_token_ids.ids.extend(prompt)
        timing = RequestTiming()
        final = None
        async for msg in self._stub.Generate(req, timeout=self.timeout_s, metadata=self.metadata):
            kind = msg.WhichOneof("kind")
            if kind == "delta":
                timing.got(list(msg.delta.token_ids))
            elif kind == "final":
                final = msg.final
        timing.finish()
        if final is None:
            raise RuntimeError(f"{self.name}: stream of {request_id} ended without its Final message")
        return timing

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
