"""Auth, limits and backend failures, through a real grpc channel to a real front door over a scripted backend."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cluster.config import FrontDoorConfig, InputLimitsConfig, TenantConfig
from cluster.frontdoor.server import FrontDoor
from cluster.types import Chunk, ChunkError, Decision
from levante.v1 import inference_pb2 as pb

from .harness import LoopThread, ScriptedBackend, channel, generate, rpc_error, serving, stub, wait_until

pytestmark = pytest.mark.e2e
REQ = pb.GenerateRequest(prompt="Hi", max_tokens=2)


@pytest.fixture
def backend():
    return ScriptedBackend()


def _hold(loop: LoopThread, backend: ScriptedBackend) -> asyncio.Event:
    backend.hold = loop.run(_event())
    return backend.hold


async def _event() -> asyncio.Event:
    return asyncio.Event()


def _open_stream(ch, metadata=()):
    """A call whose first response arrived; the scripted backend holds it open."""
    call = stub(ch).Generate(REQ, timeout=10, metadata=metadata)
    assert next(call).WhichOneof("kind") == "start"
    return call


@pytest.mark.parametrize(
    "code, status",
    [
        ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("unavailable", grpc.StatusCode.UNAVAILABLE),
        ("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_backend_errors_map_to_status_codes(loop, backend, code, status):
    backend.error = ChunkError(code, "replica", "scripted failure")
    with serving(loop, backend) as door, channel(door) as ch:
        err = rpc_error(lambda: generate(ch, REQ))
        assert err.code() == status and err.details() == "replica: scripted failure"
        backend.error = None
        assert generate(ch, REQ)[-1].final.finish_reason == pb.FINISH_REASON_STOP


def test_backend_not_ready_is_unavailable(loop, backend):
    with serving(loop, backend) as door, channel(door) as ch:
        backend.is_ready = False
        wait_until(lambda: not door._health.serving, timeout=5, what="the health poll to see the backend down")
        err = rpc_error(lambda: generate(ch, REQ))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details().startswith("backend:")
        backend.is_ready = True
        wait_until(lambda: door._health.serving, timeout=5, what="the health poll to see the backend back")
        assert generate(ch, REQ)[-1].HasField("final")


def test_no_first_chunk_in_time_is_unavailable_and_closes_the_stream(loop, backend):
    backend.first_delay_s = 5.0
    with serving(loop, backend, FrontDoorConfig(port=0, backend_timeout_s=0.3)) as door, channel(door) as ch:
        began = time.monotonic()
        err = rpc_error(lambda: generate(ch, REQ))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "no response within 0.3s" in err.details()
        assert time.monotonic() - began < 3
        wait_until(lambda: len(backend.closed) == 1, what="the backend stream to be closed")


def test_a_silent_backend_gets_heartbeats_to_callers_that_ask_and_nothing_new_to_others(loop, backend):
    backend.first_delay_s = 1.0  # five heartbeat intervals before the first chunk
    with serving(loop, backend, FrontDoorConfig(port=0, heartbeat_s=0.2)) as door, channel(door) as ch:
        asked = generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=2, stream_progress=True))
        plain = generate(ch, REQ)
    kinds = [r.WhichOneof("kind") for r in asked]
    assert kinds.count("progress") >= 3 and kinds.index("delta") > kinds.index("progress"), kinds
    assert kinds[-3:] == ["delta", "delta", "final"]
    beats = [r.progress for r in asked if r.HasField("progress")]
    assert all(p.prompt_tokens == 0 for p in beats)  # a scripted backend reports no prefill progress: unknown
    assert [r.WhichOneof("kind") for r in plain] == ["start", "delta", "delta", "final"]  # the old contract


def test_a_silent_backend_does_not_spin_the_door_for_callers_that_did_not_ask(loop, backend, monkeypatch):
    """Without Progress to send, the door still waits a heartbeat interval at a time, not in a busy loop."""
    waits = []
    real_next = FrontDoor._next

    async def counted(self, *args):
        waits.append(1)
        return await real_next(self, *args)

    monkeypatch.setattr(FrontDoor, "_next", counted)
    backend.first_delay_s = 1.0  # five heartbeat intervals before the first chunk
    with serving(loop, backend, FrontDoorConfig(port=0, heartbeat_s=0.2)) as door, channel(door) as ch:
        assert [r.WhichOneof("kind") for r in generate(ch, REQ)] == ["start", "delta", "delta", "final"]
    assert len(waits) < 50, f"{len(waits)} waits for one call: the door spins while the backend is silent"


class Raises(ScriptedBackend):
    async def generate(self, request):
        yield Chunk(decision=Decision("none", "scripted"))
        raise RuntimeError("a bug in a backend")


def test_a_backend_that_raises_ends_the_call_at_once_instead_of_heartbeating_on(loop):
    with serving(loop, Raises(), FrontDoorConfig(port=0, heartbeat_s=0.05)) as door, channel(door) as ch:
        err = rpc_error(lambda: generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=2, stream_progress=True)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "ended before its final chunk" in err.details()


def test_the_tenants_first_token_limit_reaches_the_router_but_not_from_a_forwarding_region(loop, backend):
    tenants = (
        TenantConfig("slow-ok", api_key="k", first_token_timeout_s=2.5),
        TenantConfig("eu-west", api_key="p", role="peer"),
    )
    forwarded = (("levante-forwarded-from", "eu-west"),)
    with serving(loop, backend, FrontDoorConfig(port=0, tenants=tenants)) as door, channel(door) as ch:
        generate(ch, REQ, metadata=(("authorization", "Bearer k"),))
        generate(ch, REQ, metadata=(("authorization", "Bearer p"), *forwarded))
    assert [r.first_token_timeout_s for r in backend.requests] == [2.5, None]


def test_deadline_reaches_the_backend_request(loop, backend):
    with serving(loop, backend) as door, channel(door) as ch:
        sent_at = time.time()
        generate(ch, REQ, timeout=20)
        generate(ch, REQ, timeout=None)
    with_deadline, without = backend.requests
    # grpc rounds the wire timeout up and reads a cached clock, so the server's deadline may sit a little past 20 s.
    assert with_deadline.deadline is not None and 15 < with_deadline.deadline - sent_at <= 21
    assert without.deadline is None


def test_max_inflight_is_resource_exhausted(loop, backend):
    hold = _hold(loop, backend)
    with serving(loop, backend, FrontDoorConfig(port=0, max_inflight=1)) as door, channel(door) as ch:
        first = _open_stream(ch)
        err = rpc_error(lambda: generate(ch, REQ))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_inflight" in err.details()
        loop.call(hold.set)
        assert [r.WhichOneof("kind") for r in first] == ["delta", "delta", "final"]  # "hi", then "!" + final
        assert generate(ch, REQ)[-1].HasField("final")  # the slot came back


TENANTS = (
    TenantConfig("alpha", api_key="key-alpha", max_concurrency=1, max_effort="low"),
    TenantConfig("beta", api_key_env="LEVANTE_TEST_BETA_KEY", requests_per_second=0.5, burst=1),
)
ALPHA = (("authorization", "Bearer key-alpha"),)
BETA = (("authorization", "Bearer key-beta"),)


@pytest.fixture
def tenants_config(monkeypatch):
    monkeypatch.setenv("LEVANTE_TEST_BETA_KEY", "key-beta")
    return FrontDoorConfig(port=0, tenants=TENANTS)


@pytest.mark.parametrize(
    "metadata, detail",
    [
        ((), "authorization: missing"),
        ((("authorization", "Bearer nope"),), "authorization: unknown API key"),
        ((("authorization", "key-alpha"),), "authorization: expected 'Bearer <api key>'"),
    ],
)
def test_missing_or_wrong_key_is_unauthenticated(loop, backend, tenants_config, metadata, detail):
    with serving(loop, backend, tenants_config) as door, channel(door) as ch:
        err = rpc_error(lambda: generate(ch, REQ, metadata=metadata))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details().startswith(detail)
        err = rpc_error(lambda: stub(ch).ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert generate(ch, REQ, metadata=ALPHA)[-1].HasField("final")
    assert backend.started == 1  # refused calls never reached the backend


def test_tenant_identity_and_effort_ceiling_reach_the_backend(loop, backend, tenants_config):
    with serving(loop, backend, tenants_config) as door, channel(door) as ch:
        generate(ch, REQ, metadata=ALPHA)
        generate(ch, REQ, metadata=BETA)  # key read from the environment at start
    assert [(r.tenant, r.max_effort) for r in backend.requests] == [("alpha", "low"), ("beta", "high")]


def test_request_ids_are_per_tenant(loop, backend, tenants_config):
    # Two tenants may pick the same id: the engine sees them apart, each client gets its own id back.
    same = pb.GenerateRequest(prompt="Hi", max_tokens=2, request_id="job-1")
    with serving(loop, backend, tenants_config) as door, channel(door) as ch:
        answers = [generate(ch, same, metadata=md) for md in (ALPHA, BETA)]
    assert [r.request_id for r in backend.requests] == ["alpha/job-1", "beta/job-1"]
    assert [a[0].start.request_id for a in answers] == ["job-1", "job-1"]
    assert [a[-1].final.request_id for a in answers] == ["job-1", "job-1"]


def test_tenant_concurrency_limit(loop, backend, tenants_config):
    hold = _hold(loop, backend)
    with serving(loop, backend, tenants_config) as door, channel(door) as ch:
        first = _open_stream(ch, ALPHA)
        err = rpc_error(lambda: generate(ch, REQ, metadata=ALPHA))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'alpha'" in err.details()
        assert "max_concurrency" in err.details()
        loop.call(hold.set)
        list(first)
        assert generate(ch, REQ, metadata=ALPHA)[-1].HasField("final")


def test_tenant_rate_limit(loop, backend, tenants_config):
    with serving(loop, backend, tenants_config) as door, channel(door) as ch:
        assert generate(ch, REQ, metadata=BETA)[-1].HasField("final")  # the burst of 1
        err = rpc_error(lambda: generate(ch, REQ, metadata=BETA))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests/s" in err.details()
        assert generate(ch, REQ, metadata=ALPHA)[-1].HasField("final")  # other tenants are not affected


def test_missing_key_variable_fails_start_naming_it(loop, backend, monkeypatch):
    monkeypatch.delenv("LEVANTE_TEST_BETA_KEY", raising=False)
    from cluster.frontdoor import FrontDoor

    door = FrontDoor(FrontDoorConfig(port=0, tenants=TENANTS), backend, "r", "m")
    with pytest.raises(ValueError, match=r"tenants\[1\] \('beta'\)\.api_key_env: .*LEVANTE_TEST_BETA_KEY"):
        loop.run(door.start())


# -- bounded inputs: a refusal reaches the client as INVALID_ARGUMENT naming the field, never an echo of
# the input too large for the client's metadata limit (which it would report as RESOURCE_EXHAUSTED)

MAX_DETAILS = 300  # cluster.frontdoor.errors.MAX_DETAILS_CHARS
BIG = 900_000


def _chat(role: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role=role, content="Hi")]), max_tokens=2)


@pytest.mark.parametrize(
    "request_, config, field",
    [
        (_chat("r" * BIG), FrontDoorConfig(port=0), "chat.messages[0].role"),
        (pb.GenerateRequest(prompt="Hi", model="m" * BIG), FrontDoorConfig(port=0), "model"),
        (
            pb.GenerateRequest(prompt="Hi", stop_token_ids=[1] * 299_999 + [-1]),
            FrontDoorConfig(port=0),
            "stop_token_ids",
        ),
        (  # with the count cap raised past them: the bad id itself is named, not the 300,000 others
            pb.GenerateRequest(prompt="Hi", stop_token_ids=[1] * 299_999 + [-1]),
            FrontDoorConfig(port=0, limits=InputLimitsConfig(max_stop_token_ids=300_000)),
            "stop_token_ids",
        ),
        (  # past our cap, SamplingParams' own check names the bad (empty) one without echoing the long one
            pb.GenerateRequest(prompt="Hi", stop=["s" * BIG, ""]),
            FrontDoorConfig(port=0, limits=InputLimitsConfig(max_stop_string_chars=BIG)),
            "stop",
        ),
    ],
    ids=[
        "900KB role",
        "900KB model name",
        "300k stop ids, one bad",
        "300k stop ids allowed, one bad",
        "900KB stop string allowed, one empty",
    ],
)
def test_huge_bad_fields_reach_the_client_as_invalid_argument_naming_the_field(loop, backend, request_, config, field):
    with serving(loop, backend, config) as door, channel(door) as ch:
        err = rpc_error(lambda: generate(ch, request_))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith(f"{field}: ") and len(err.details()) <= MAX_DETAILS, err.details()
        assert generate(ch, REQ)[-1].HasField("final")
    assert backend.started == 1  # only the good call reached the backend


def test_a_backend_refusal_with_huge_details_still_reaches_the_client_with_its_code(loop, backend):
    backend.error = ChunkError("invalid_argument", "prompt", "x" * 100_000)  # a peer region echoing a prompt
    with serving(loop, backend) as door, channel(door) as ch:
        err = rpc_error(lambda: generate(ch, REQ))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("prompt: xxx") and len(err.details()) <= MAX_DETAILS


@pytest.mark.parametrize(
    "request_, limits, message",
    [
        (
            pb.GenerateRequest(prompt="Hi", stop=["a", "b", "c"]),
            InputLimitsConfig(max_stop_strings=2),
            "stop: at most 2 stop strings (frontdoor.limits.max_stop_strings), got 3",
        ),
        (
            pb.GenerateRequest(prompt="Hi", stop_token_ids=[1, 2]),
            InputLimitsConfig(max_stop_token_ids=1),
            "stop_token_ids: at most 1 stop token ids (frontdoor.limits.max_stop_token_ids), got 2",
        ),
        (
            pb.GenerateRequest(prompt="Hi", request_id="abcd"),
            InputLimitsConfig(max_request_id_chars=3),
            "request_id: at most 3 characters (frontdoor.limits.max_request_id_chars), got 4",
        ),
        (
            pb.GenerateRequest(prompt="Hi", logprobs=3),
            InputLimitsConfig(max_logprobs=2),
            "logprobs: must be in [0, 2], got 3 (frontdoor.limits.max_logprobs)",
        ),
    ],
)
def test_configured_caps_reach_the_client(loop, backend, request_, limits, message):
    with serving(loop, backend, FrontDoorConfig(port=0, limits=limits)) as door, channel(door) as ch:
        err = rpc_error(lambda: generate(ch, request_))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
