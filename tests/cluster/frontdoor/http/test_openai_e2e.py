"""The OpenAI-compatible HTTP API through the official ``openai`` client, against a real front door
on a real engine (tiny Mistral 4 shaped MoE with reasoning), checked against the same call over gRPC."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from cluster.config import FrontDoorConfig, TelemetryConfig
from engine.config import ReasoningConfig
from levante.v1 import inference_pb2 as pb

from ..harness import MODEL, channel, engine_backend, generate, serving, tiny_engine, wait_until
from .harness import client

pytestmark = pytest.mark.e2e
BUDGET_LOW = 6
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine(tiny_moe):
    with tiny_engine(tiny_moe, reasoning=ReasoningConfig(budget_low=BUDGET_LOW)) as eng:
        yield eng


@pytest.fixture(scope="module")
def door(engine, loop):
    with serving(loop, engine_backend(loop, engine)) as d:
        yield d


@pytest.fixture(scope="module")
def oai(door):
    return client(door)


def stats(loop, engine):
    return loop.run(engine.stats())


def grpc_text(door, **fields) -> tuple[str, str]:
    with channel(door) as ch:
        out = generate(ch, pb.GenerateRequest(**fields))
    deltas = [r.delta for r in out if r.HasField("delta")]
    return "".join(d.text for d in deltas), "".join(d.reasoning_text for d in deltas)


def test_chat_whole_and_streamed_give_the_grpc_answer(door, oai):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hello")])
    text, _ = grpc_text(door, chat=chat, max_tokens=8, temperature=0, reasoning_effort=pb.REASONING_EFFORT_NONE)
    whole = oai.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0, reasoning_effort="none"
    )
    assert whole.object == "chat.completion" and whole.model == MODEL and whole.id.startswith("chatcmpl-")
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text and text
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8 and whole.usage.prompt_tokens > 0
    events = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_completion_tokens=8,
            temperature=0,
            reasoning_effort="none",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert len({e.id for e in events}) == 1 and all(e.usage is None for e in events[:-1])
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 8


def test_completions_take_text_and_token_ids(door, oai):
    text, _ = grpc_text(
        door, prompt="Hello there", max_tokens=5, temperature=0, reasoning_effort=pb.REASONING_EFFORT_NONE
    )
    none = {"reasoning_effort": "none"}  # an extension for completions: the client sends it as extra_body
    out = oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0, extra_body=none)
    assert out.object == "text_completion" and out.choices[0].text == text
    streamed = oai.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=5, temperature=0, stream=True, extra_body=none
    )
    assert "".join(e.choices[0].text for e in streamed) == text
    ids = oai.completions.create(model=MODEL, prompt=[1, 22557, 1117], max_tokens=3)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def test_models_lists_the_served_model(oai, engine, loop):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "levante"
    assert models[0].max_model_len == loop.run(engine.info()).max_model_len


def test_low_effort_keeps_reasoning_content_apart_and_counts_it(door, oai):
    fields = dict(model=MODEL, messages=HELLO, max_tokens=24, temperature=0, reasoning_effort="low")
    whole = oai.chat.completions.create(**fields)
    message = whole.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content
    assert whole.usage.completion_tokens_details.reasoning_tokens == BUDGET_LOW  # random weights: the budget ends it
    assert "<think>" not in message.content and "</think>" not in message.content and "</think>" not in reasoning
    events = list(oai.chat.completions.create(**fields, stream=True))
    deltas = [e.choices[0].delta for e in events]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content
    assert not any(d.content and d.model_extra.get("reasoning_content") for d in deltas)


def test_logprobs_name_each_token_and_rank_the_greedy_choice_first(oai):
    out = oai.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, reasoning_effort="none"
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for lp in content:
        assert lp.token.startswith("token_id:") and lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token == lp.token  # greedy
    completion = oai.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=2, extra_body={"reasoning_effort": "none"}
    )
    assert len(completion.choices[0].logprobs.tokens) == 3
    assert all(len(top) == 2 for top in completion.choices[0].logprobs.top_logprobs)


def _freed(loop, engine, before: int, max_tokens: int) -> None:
    wait_until(
        lambda: stats(loop, engine).num_used_blocks == 0 and stats(loop, engine).num_running == 0,
        timeout=10,
        what="the engine to free the request of the client that left",
    )
    assert stats(loop, engine).num_generated_tokens - before < max_tokens  # stopped, not run to completion


def test_a_client_that_leaves_a_stream_frees_its_kv_blocks(door, loop, engine):
    before = stats(loop, engine).num_generated_tokens
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 900, "stream": True, "reasoning_effort": "none"}
    with (
        httpx.Client(base_url=door.http.url, timeout=30) as h,
        h.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert next(line for line in r.iter_lines() if line.startswith("data: "))  # the engine took it
    _freed(loop, engine, before, 900)


def test_a_client_that_leaves_a_whole_response_frees_its_kv_blocks(door, loop, engine):
    before = stats(loop, engine).num_generated_tokens
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 900, "reasoning_effort": "none"}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
    with socket.create_connection(("127.0.0.1", door.http.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        wait_until(lambda: stats(loop, engine).num_running == 1, what="the engine to run the request")
    # the client left before any byte of the answer
    _freed(loop, engine, before, 900)


def test_metrics_are_served_on_the_http_port_when_on(loop, engine):
    from cluster.telemetry.metrics import ServerMetrics

    metrics = ServerMetrics("test-region", MODEL)
    from cluster.frontdoor import FrontDoor

    door = FrontDoor(FrontDoorConfig(port=0), engine_backend(loop, engine), "test-region", MODEL, metrics=metrics)
    loop.run(door.start())
    try:
        client(door).completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        text = httpx.get(f"{door.http.url}/metrics").text
    finally:
        loop.run(door.stop())
    assert 'levante_requests_total{code="OK"} 1.0' in text
    assert TelemetryConfig().metrics.enabled is False  # off by default: then no /metrics route
