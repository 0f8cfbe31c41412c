"""A prompt whose prefill takes many times the liveness limit streams through, with the shipped health defaults.

eu-west is a real region on Ray (the embedded SmolLM2, prefilling 512 tokens per step, each step about as
long as the idle limit itself): its replica sends keepalives and prefill progress, its front door Progress
messages. us-east is a second front door in this process whose region router forwards to eu-west over
gRPC. The same long prompt goes through eu-west alone (a plain gRPC client, and the client library) and
through us-east to eu-west; none of them may fail over, eject or mark a region unhealthy. One Ray cluster
for the module (its own temp dir, stopped at the end).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from cluster.config import ClusterConfig, FrontDoorConfig, HealthCheckConfig, PeerConfig, RegionsConfig
from cluster.config_loader import config_from_dict
from cluster.frontdoor.server import FrontDoor
from cluster.regions.health_book import HEALTHY
from cluster.regions.region_client import RegionClient
from cluster.regions.region_router import build_region_router
from cluster.types import Backend, Chunk, GenerateRequest, ModelInfo
from levante.v1 import inference_pb2 as pb

from ..frontdoor.harness import generate, running_region

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

DEFAULTS = HealthCheckConfig()  # the shipped liveness settings, untouched
# Several thousand prompt tokens: a dozen seconds of prefill on one CPU thread, in steps of 512 tokens.
DOCUMENT = "The lighthouse keeper counted the ships that passed the cape each night, and wrote them down. " * 170


def messages(test: str) -> list[dict[str, str]]:
    """The long prompt, opening with the test's own name: no test finds another's prompt in the prefix cache."""
    return [{"role": "user", "content": f"({test}) {DOCUMENT}\n\nWho counted the ships?"}]


# Progress messages the caller must see before the first token: at one per heartbeat, this many mean a
# prefill of at least three times the idle limit (if the machine prefills faster, the premise fails here)
MIN_BEATS = round(3 * DEFAULTS.stream_idle_timeout_s / FrontDoorConfig().heartbeat_s)


def eu_config() -> dict:
    return {
        "region": "eu-west",
        "engine": {
            "model": {"model": None, "num_threads": 1, "max_model_len": 4096},
            "scheduler": {"max_num_batched_tokens": 512},
        },
        "replica": {"num_replicas": 1, "cpus_per_rank": 1},
        "frontdoor": {"port": 0},
        "ray": {"num_cpus": 2},
    }


class NotHere(Backend):
    """us-east's own replicas: never asked, since every request here prefers eu-west."""

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        yield Chunk(finished=True, finish_reason="stop")

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo("levante-default", 4096)]

    async def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def eu(loop):
    with running_region(loop, config_from_dict(eu_config(), "test"), "eu-west") as server:
        yield server


@pytest.fixture(scope="module")
def us(loop, eu):
    peer = PeerConfig(name="eu-west", target=f"127.0.0.1:{eu.port}")
    cfg = ClusterConfig(region="us-east", frontdoor=FrontDoorConfig(port=0), regions=RegionsConfig(peers=(peer,)))
    local = NotHere()
    router = build_region_router(cfg, local)
    hops: list = []
    router.backend.failover_listeners.append(hops.append)
    door = FrontDoor(cfg.frontdoor, router.backend, "us-east", cfg.model_name)

    async def start() -> None:
        router.start()  # its health checks run on the servers' loop
        await door.start()

    loop.run(start())
    try:
        yield door, router, local, hops
    finally:
        loop.run(door.stop())
        loop.run(router.stop())


def ask(port: int, test: str, preferred: str | None = None) -> list[pb.GenerateResponse]:
    req = pb.GenerateRequest(max_tokens=4, temperature=0.0, stream_progress=True, request_id=test)
    req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages(test))
    if preferred is not None:
        req.preferred_region = preferred
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        began = time.monotonic()
        out = generate(ch, req, timeout=600)
    kinds = [r.WhichOneof("kind") for r in out]
    print(f"{len(out)} messages in {time.monotonic() - began:.1f}s: {kinds.count('progress')} Progress")
    return out


def check_stream(out: list[pb.GenerateResponse], region: str) -> None:
    first_delta = next(i for i, r in enumerate(out) if r.HasField("delta"))
    progress = [r.progress for r in out[:first_delta] if r.HasField("progress")]
    assert len(progress) >= MIN_BEATS, f"only {len(progress)} Progress before the first token"
    done = [p.prompt_tokens_processed for p in progress if p.prompt_tokens]
    assert len(set(done)) >= 3 and done == sorted(done), done  # the engine's own steps, in order
    total = {p.prompt_tokens for p in progress if p.prompt_tokens}
    final = out[-1].final
    assert total == {final.usage.prompt_tokens} and final.usage.prompt_tokens > 2048
    assert final.served_by.region == region and list(final.failovers) == []
    assert final.usage.completion_tokens == 4


def untroubled(book, region: str) -> None:
    """Never left, ejected or marked unhealthy, by any request or check."""
    health = book.regions[region]
    assert book.available(region) and health.ejections == 0, (region, health.reason)
    assert [t for t in book.transitions if t.region == region and t.state != HEALTHY] == []


def test_through_one_region_no_failover_and_no_ejection(eu):
    check_stream(ask(eu.port, "one region"), "eu-west")
    untroubled(eu.router.book, "eu-west")


def test_through_a_second_region_its_router_hears_the_heartbeats(eu, us):
    door, router, local, hops = us
    check_stream(ask(door.port, "two regions", preferred="eu-west"), "eu-west")
    assert hops == [] and local.requests == []
    untroubled(router.book, "eu-west")
    untroubled(eu.router.book, "eu-west")


def test_the_client_library_with_the_shipped_defaults_does_not_leave_a_prefilling_region(loop, eu, us):
    door = us[0]

    async def stream() -> tuple[list[Chunk], RegionClient]:
        endpoints = [f"eu-west=127.0.0.1:{eu.port}", f"us-east=127.0.0.1:{door.port}"]
        async with RegionClient(endpoints, health=DEFAULTS) as client:
            chunks = [c async for c in client.generate(messages("client library"), max_tokens=4, temperature=0.0)]
        return chunks, client

    chunks, client = loop.run(asyncio.wait_for(stream(), 600), timeout=620)
    final = chunks[-1]
    assert final.error is None and final.failovers is None and final.served_by.region == "eu-west"
    seen = [c.progress.prompt_tokens_processed for c in chunks if c.progress is not None and not c.token_ids]
    assert len(set(seen)) >= 3 and seen == sorted(seen)
    untroubled(client.book, "eu-west")
