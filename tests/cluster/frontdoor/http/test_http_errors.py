"""The HTTP API's refusals, through the official ``openai`` client against a real front door (scripted
backend): OpenAI's error shape, the status codes, ``Retry-After``, and the field named in ``param``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket

import grpc
import httpx
import openai
import pytest

from cluster.config import FrontDoorConfig, HttpConfig, TenantConfig
from cluster.config_loader import ConfigError, config_from_dict
from cluster.frontdoor import FrontDoor
from cluster.frontdoor.http.app import TIMEOUT_HEADER
from cluster.types import Chunk, ChunkError
from levante.v1 import inference_pb2 as pb

from ..harness import MODEL, ScriptedBackend, channel, generate, rpc_error, serving, wait_until
from .harness import client, status_error

pytestmark = pytest.mark.e2e
KEY = "acme-key"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def backend():
    return ScriptedBackend()


def chat(c: openai.OpenAI, **fields):
    return c.chat.completions.create(**{"model": MODEL, "messages": HI, **fields})


def test_the_shipped_http_port_is_8000_and_null_turns_http_off():
    ports = {f.name: f.default for f in dataclasses.fields(HttpConfig)}
    assert ports["port"] == 8000  # the tests' own front doors bind port 0 (tests/conftest.py)
    assert not config_from_dict({"frontdoor": {"http": {"port": None}}}).frontdoor.http.enabled
    with pytest.raises(ConfigError, match=r"frontdoor\.http\.port"):
        config_from_dict({"frontdoor": {"http": {"port": 70000}}})
    with pytest.raises(ValueError, match=r"^http\.port"):
        FrontDoorConfig(port=9000, http=HttpConfig(port=9000))


def test_http_off_serves_grpc_only(loop, backend):
    with serving(loop, backend, FrontDoorConfig(port=0, http=HttpConfig(port=None))) as door:
        assert door.http is None and door.port


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BIG_SCHEMA = {"type": "object", "description": "x" * 40_000}


@pytest.mark.parametrize(
    "fields, status, param, message",
    [
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "frequency_penalty: not supported"),
        ({"logit_bias": {"1": 2}}, 400, "logit_bias", "logit_bias: not supported"),
        ({"n": 2}, 400, "n", "n: only 1 choice"),
        ({"temperature": "hot"}, 400, "temperature", "temperature: must be a number"),
        ({"temperature": -1}, 400, "temperature", "temperature"),
        ({"max_tokens": 10_000}, 400, "max_tokens", "max_tokens: must be in [1, 256]"),
        ({"stop": ["x"] * 17}, 400, "stop", "stop: at most 16 stop strings (frontdoor.limits.max_stop_strings)"),
        ({"top_logprobs": 3}, 400, "top_logprobs", "needs logprobs: true"),
        ({"reasoning_effort": "extreme"}, 400, "reasoning_effort", "reasoning_effort: must be one of"),
        ({"messages": []}, 400, "messages", "messages: must not be empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "must be one of"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400, "messages[0].tool_calls", "user"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]", "text"),
        ({"response_format": {"type": "yaml"}}, 400, "response_format.type", "must be text, json_object"),
        ({"tool_choice": "required"}, 400, "tool_choice", "'required' needs tools"),
        ({"tools": [TOOL] * 65}, 400, "tools", "at most 64 tools (frontdoor.limits.max_tools), got 65"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": BIG_SCHEMA}}},
            400,
            "response_format.json_schema",
            "(frontdoor.limits.max_schema_bytes)",
        ),
        ({"model": "gpt-4o"}, 404, "model", "model: unknown model 'gpt-4o'"),
    ],
)
def test_bad_fields_get_openai_errors_naming_the_field(loop, backend, fields, status, param, message):
    with serving(loop, backend) as door:
        err = status_error(lambda: chat(client(door), **fields))
    assert err.status_code == status
    assert err.body["param"] == param and message in err.body["message"], err.body
    assert err.body["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert backend.started == 0  # refused at the door


def test_bad_json_oversized_bodies_and_unknown_routes(loop, backend):
    with serving(loop, backend, FrontDoorConfig(port=0, max_request_bytes=4096)) as door:
        url = door.http.url
        bad = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": ')
        big = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x" * 100_000})
        nan = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny-moe", "prompt": "x", "temperature": NaN}')
        route = httpx.get(f"{url}/v2/nothing")
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("request: the body is not valid JSON")
    assert big.status_code == 413 and "max_request_bytes 4096" in big.json()["error"]["message"]
    assert len(big.text) < 400  # the 100 KB prompt is not echoed
    assert nan.status_code == 400 and "NaN is not a JSON number" in nan.json()["error"]["message"]
    assert route.status_code == 404 and route.json()["error"]["code"] == "not_found"


TENANTS = (TenantConfig("acme", api_key=KEY, requests_per_second=0.001, burst=1),)


def test_bad_key_is_401_and_over_the_tenants_rate_is_429_with_retry_after(loop, backend):
    cfg = FrontDoorConfig(port=0, tenants=TENANTS, retry_after_ms=2500)
    with serving(loop, backend, cfg) as door:
        wrong = status_error(lambda: chat(client(door, key="wrong")))
        models = status_error(lambda: client(door, key="wrong").models.list())
        assert chat(client(door, key=KEY)).choices[0].message.content == "hi!"  # the burst of one
        over = status_error(lambda: chat(client(door, key=KEY)))
    assert wrong.status_code == 401 and wrong.body["message"] == "authorization: unknown API key"
    assert wrong.body["type"] == "authentication_error" and models.status_code == 401
    assert over.status_code == 429 and "tenant 'acme': over" in over.body["message"]
    assert over.response.headers["retry-after"] == "3" and over.response.headers["retry-after-ms"] == "2500"
    assert backend.started == 1


def test_backend_refusals_map_to_status_codes(loop, backend):
    expected = {"unavailable": 503, "resource_exhausted": 429, "permission_denied": 403, "invalid_argument": 400}
    with serving(loop, backend) as door:
        for code, status in expected.items():
            backend.error = ChunkError(code, "replica", "scripted failure")
            err = status_error(lambda: chat(client(door)))
            assert err.status_code == status and err.body["message"] == "replica: scripted failure"
            assert err.body["code"] == code


def test_draining_door_is_503_and_health_says_so(loop, backend):
    with serving(loop, backend) as door:
        assert httpx.get(f"{door.http.url}/health").status_code == 200
        loop.run(door.pause())
        err = status_error(lambda: chat(client(door)))
        health = httpx.get(f"{door.http.url}/health")
        loop.run(door.resume())
    assert err.status_code == 503 and "draining" in err.body["message"]
    assert health.status_code == 503 and health.json() == {"status": "not_serving"}


def test_deadline_header_is_504_and_closes_the_backend_stream(loop, backend):
    backend.hold = asyncio.Event()  # the stream never finishes by itself
    with serving(loop, backend) as door:
        c = client(door, default_headers={TIMEOUT_HEADER: "0.5"})
        whole = status_error(lambda: chat(c))
        bad = status_error(lambda: chat(client(door, default_headers={TIMEOUT_HEADER: "soon"})))
        wait_until(lambda: len(backend.closed) == 1, what="the backend stream to close")
        loop.call(backend.hold.set)
    assert whole.status_code == 504 and whole.body["message"] == "deadline: passed before the stream finished"
    assert bad.status_code == 400 and bad.body["param"] == TIMEOUT_HEADER
    assert backend.requests[0].deadline is not None


def test_a_refusal_mid_stream_is_an_error_event(loop, backend):
    backend.hold = asyncio.Event()
    with serving(loop, backend, FrontDoorConfig(port=0, backend_timeout_s=0.5)) as door:
        stream = chat(client(door), stream=True)
        first = next(iter(stream))
        with pytest.raises(openai.APIError, match="backend: no response within 0.5s"):
            list(stream)
        loop.call(backend.hold.set)
    assert first.choices[0].delta.content == "hi"


class Floods(ScriptedBackend):
    """An endless stream of large chunks, until its generator is closed."""

    async def generate(self, request):
        self.requests.append(request)
        try:
            while True:
                yield Chunk(token_ids=[7], text="x" * 65536)
                await asyncio.sleep(0)
        finally:
            self.closed.append(request.request_id)


def test_a_client_that_reads_nothing_loses_its_stream_after_write_timeout(loop):
    backend = Floods()
    body = json.dumps({"model": MODEL, "prompt": "Hi", "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
    with serving(loop, backend, FrontDoorConfig(port=0, write_timeout_s=0.5)) as door:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once: the door's writes wait
            sock.connect(("127.0.0.1", door.http.port))
            sock.sendall(head.encode() + b"\r\n\r\n" + body)
            wait_until(
                lambda: len(backend.closed) == 1, timeout=30, what="the stream of the client that reads nothing to stop"
            )
        wait_until(lambda: door._inflight == 0, what="its slot to be freed")


def test_a_taken_http_port_fails_start_naming_the_key(loop, backend):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        door = FrontDoor(FrontDoorConfig(port=0, http=HttpConfig(port=taken.getsockname()[1])), backend, "r", MODEL)
        with pytest.raises(OSError, match=r"^frontdoor\.http\.port: cannot bind 127\.0\.0\.1:\d+"):
            loop.run(door.start())
    assert door.http is None and door._server is None  # the gRPC server it had started is stopped again


def test_a_full_door_is_429_with_retry_after_and_counts_grpc_and_http_together(loop, backend):
    backend.hold = asyncio.Event()  # the first call stays in flight
    cfg = FrontDoorConfig(port=0, max_inflight=1, maximum_concurrent_rpcs=2, retry_after_ms=500)
    with serving(loop, backend, cfg) as door:
        stream = chat(client(door), stream=True)
        assert next(iter(stream)).choices[0].delta.content == "hi"  # in flight over HTTP
        full = status_error(lambda: chat(client(door)))
        with channel(door) as ch:
            grpc_full = rpc_error(lambda: generate(ch, pb.GenerateRequest(prompt="Hi"), timeout=10))
        loop.call(backend.hold.set)
        assert [e.choices[0].finish_reason for e in stream] == ["stop"]
    assert full.status_code == 429 and "(max_inflight)" in full.body["message"]
    assert full.response.headers["retry-after"] == "1" and full.response.headers["retry-after-ms"] == "500"
    assert grpc_full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # one door, one count
