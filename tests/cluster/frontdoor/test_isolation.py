"""Tenant isolation at the front door: prefix-cache hits per tenant group, request ids per tenant, twins refused.

A real grpc front door on a real tiny engine (cached_tokens as the client reads it), and on a
scripted backend (what reaches the backend, and a twin held open while the original runs).
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from cluster.backends.peer import PeerBackend
from cluster.config import FrontDoorConfig, PeerConfig, TenantConfig
from cluster.frontdoor.convert import FORWARDED_REQUEST_ID_CHARS, encode_generate
from cluster.frontdoor.isolation import cache_salt
from cluster.policy.replicas import prefix_key
from cluster.types import CACHE_SALT, GenerateRequest
from engine.api import create_engine
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.types import SamplingParams
from levante.v1 import inference_pb2 as pb

from .harness import (
    GENERATE,
    MODEL,
    ScriptedBackend,
    channel,
    engine_backend,
    generate,
    rpc_error,
    serving,
    spm_tokenizer,
    wait_until,
)

# a and c share a prefix-cache group; b has one of its own (its name)
TENANTS = (
    TenantConfig("a", api_key="key-a", prefix_cache_group="team"),
    TenantConfig("b", api_key="key-b"),
    TenantConfig("c", api_key="key-c", prefix_cache_group="team"),
)
LONG = " ".join(f"line {i} of a long shared system prompt." for i in range(40))


def key(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer key-{tenant}"),)


@pytest.fixture(scope="module")
def engine(tiny_moe):
    eng = create_engine(
        EngineConfig(
            model=ModelConfig(model=tiny_moe, tokenizer=spm_tokenizer(), num_threads=1),
            cache=CacheConfig(num_blocks=128),
            scheduler=SchedulerConfig(max_model_len=1024),
        )
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def ch(engine, loop):
    backend = engine_backend(loop, engine)
    with serving(loop, backend, FrontDoorConfig(port=0, tenants=TENANTS)) as door, channel(door) as c:
        yield c


def cached_tokens(ch, tenant: str, prompt: str = LONG, **fields) -> int:
    req = pb.GenerateRequest(prompt=prompt, max_tokens=2, temperature=0, ignore_eos=True, **fields)
    return generate(ch, req, metadata=key(tenant))[-1].final.usage.cached_tokens


def test_cached_tokens_report_only_the_callers_own_group(ch):
    assert cached_tokens(ch, "a") == 0
    assert cached_tokens(ch, "b") == 0  # a's prefix is in the cache, but not for b
    assert cached_tokens(ch, "a") > 0  # a's own hit
    assert cached_tokens(ch, "c") > 0  # c shares a's group: configured sharing hits
    assert cached_tokens(ch, "b") > 0  # and b now hits its own


def test_a_twin_is_refused_and_the_original_streams_whole_when_the_twin_is_cancelled(ch):
    call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
    req = pb.GenerateRequest(prompt="Hello there", max_tokens=150, temperature=0, ignore_eos=True, request_id="dup")
    original = call(req.SerializeToString(), timeout=60, metadata=key("a"))
    assert next(original).WhichOneof("kind") == "start"
    twin = call(req.SerializeToString(), timeout=60, metadata=key("a"))
    with pytest.raises(grpc.RpcError) as refused:
        next(twin)
    twin.cancel()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "request_id: 'dup' is already in flight; use a new id per call"
    rest = list(original)
    final = rest[-1].final
    assert final.request_id == "dup" and final.finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(r.delta.token_ids) for r in rest if r.HasField("delta")) == 150 == final.usage.completion_tokens


# ---- on a scripted backend: what reaches it --------------------------------------------------


@pytest.fixture(scope="module")
def scripted(loop):
    backend = ScriptedBackend()
    with serving(loop, backend, FrontDoorConfig(port=0, tenants=TENANTS)) as door, channel(door) as c:
        yield backend, door, c


def test_ids_are_per_tenant_and_a_twin_never_reaches_the_backend(scripted, loop):
    backend, _, ch = scripted
    backend.requests.clear()
    backend.hold = loop.run(_event())
    call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
    raw = pb.GenerateRequest(prompt="hi", request_id="same").SerializeToString()
    first, other = call(raw, timeout=30, metadata=key("a")), call(raw, timeout=30, metadata=key("b"))
    wait_until(lambda: len(backend.requests) == 2, what="both tenants' calls at the backend")
    err = rpc_error(lambda: generate(ch, raw, metadata=key("a")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("request_id: 'same'")
    loop.call(backend.hold.set)
    assert [r.final.request_id for r in (list(first)[-1], list(other)[-1])] == ["same", "same"]
    assert sorted(r.request_id for r in backend.requests) == ["a/same", "b/same"]
    assert backend.closed == []  # nothing was cut short
    backend.hold = None
    generate(ch, raw, metadata=key("a"))  # the id is free again once its call ended
    assert [r.request_id for r in backend.requests[2:]] == ["a/same"]


async def _event() -> asyncio.Event:
    return asyncio.Event()  # made on the server's loop, which waits on it


def test_each_call_carries_its_tenants_salt_and_a_forwarded_salt_only_narrows_it(scripted):
    backend, _, ch = scripted
    backend.requests.clear()
    generate(ch, pb.GenerateRequest(prompt="hi"), metadata=key("a"))
    generate(ch, pb.GenerateRequest(prompt="hi"), metadata=key("b"))
    generate(ch, pb.GenerateRequest(prompt="hi"), metadata=key("b") + ((CACHE_SALT, "team"),))
    salts = [r.params.cache_salt for r in backend.requests]
    assert salts == ["team", "b", json.dumps(["b", "team"])]  # b cannot become "team" by asking


def test_a_peer_forward_sends_its_callers_salt(scripted, loop):
    backend, door, _ = scripted
    backend.requests.clear()
    peer = PeerBackend(PeerConfig("peer", f"localhost:{door.port}"), forwarded_from="origin", api_key="key-b")
    request = GenerateRequest("a/x", MODEL, "hi", SamplingParams(cache_salt="team"))

    async def forward() -> list:
        try:
            return [c async for c in peer.generate(request)]
        finally:
            await peer.close()

    assert loop.run(forward())[-1].finished
    assert [(r.request_id, r.params.cache_salt) for r in backend.requests] == [("b/a/x", cache_salt("b", "team"))]


# ---- the pieces ---------------------------------------------------------------------------


def forwarded_request_id(request_id: str) -> str:
    raw = encode_generate(GenerateRequest(request_id, MODEL, "hi", SamplingParams()))
    return pb.GenerateRequest.FromString(raw).request_id


def test_a_long_forwarded_id_keeps_its_tenant():
    """Cut to the last 128 characters, two tenants' long ids would become one id at the peer."""
    client_id = "x" * FORWARDED_REQUEST_ID_CHARS
    a, b = forwarded_request_id(f"a/{client_id}"), forwarded_request_id(f"b/{client_id}")
    assert a != b and max(len(a), len(b)) <= FORWARDED_REQUEST_ID_CHARS
    assert forwarded_request_id("a/short") == "a/short"  # ids that fit go as they are


def test_prefix_affinity_keys_are_per_salt():
    assert prefix_key(LONG, 64, "team") == prefix_key(LONG, 64, "team")
    assert prefix_key(LONG, 64, "team") != prefix_key(LONG, 64, "b") != prefix_key(LONG, 64)
    assert prefix_key("", 64, "team") is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "a/b"}, "^name: must not contain '/', got 'a/b'"),
        ({"name": "a", "prefix_cache_group": ""}, "^prefix_cache_group: must not be empty"),
    ],
)
def test_tenant_config_refuses_what_would_break_isolation(fields, message):
    with pytest.raises(ValueError, match=message):
        TenantConfig(api_key="k", **fields)
