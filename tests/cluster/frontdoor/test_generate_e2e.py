"""Generate through a real grpc channel, a real grpc.aio front door and a real (tiny MoE) engine."""

from __future__ import annotations

import re

import grpc
import pytest

from cluster.config import FrontDoorConfig
from engine.config import ReasoningConfig
from levante.v1 import inference_pb2 as pb

from .harness import MODEL, channel, engine_backend, generate, rpc_error, serving, stub, tiny_engine, wait_until

pytestmark = pytest.mark.e2e
BUDGET_LOW = 6
MAX_REQUEST_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def engine(tiny_moe):
    with tiny_engine(tiny_moe, reasoning=ReasoningConfig(budget_low=BUDGET_LOW)) as eng:
        yield eng


@pytest.fixture(scope="module")
def door(engine, loop):
    backend = engine_backend(loop, engine)
    with serving(loop, backend, FrontDoorConfig(port=0, max_request_bytes=MAX_REQUEST_BYTES)) as d:
        yield d


@pytest.fixture(scope="module")
def ch(door):
    with channel(door) as c:
        yield c


def stats(loop, engine):
    return loop.run(engine.stats())


def kinds(responses) -> list[str]:
    return [r.WhichOneof("kind") for r in responses]


def assert_still_serves(ch) -> None:
    out = generate(ch, pb.GenerateRequest(prompt="Hello", max_tokens=2, temperature=0, ignore_eos=True))
    assert out[-1].final.usage.completion_tokens == 2


def test_text_prompt_streams_start_deltas_final(ch):
    out = generate(
        ch,
        pb.GenerateRequest(
            prompt="Hello there", max_tokens=12, temperature=0, ignore_eos=True, request_id="client-id-1"
        ),
    )
    assert kinds(out)[0] == "start" and kinds(out)[-1] == "final" and set(kinds(out)[1:-1]) == {"delta"}
    start, final = out[0].start, out[-1].final
    assert start.request_id == final.request_id == "client-id-1"
    assert start.decision.reasoning_effort == pb.REASONING_EFFORT_NONE  # unspecified = auto -> none for "Hello"
    assert start.decision.reason.startswith("auto:")
    tokens = [t for r in out if r.HasField("delta") for t in r.delta.token_ids]
    assert len(tokens) == 12 == final.usage.completion_tokens
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.prompt_tokens > 0
    assert (final.served_by.region, final.served_by.replica) == ("test-region", "local-0")
    assert final.decision == start.decision


def test_server_makes_a_request_id_when_none_is_given(ch):
    out = generate(ch, pb.GenerateRequest(prompt="Hi", max_tokens=1))
    assert len(out[0].start.request_id) >= 16 and out[-1].final.request_id == out[0].start.request_id


def test_low_effort_keeps_reasoning_apart_from_the_answer(ch):
    out = generate(
        ch,
        pb.GenerateRequest(
            prompt="Hello", max_tokens=24, temperature=0, ignore_eos=True, reasoning_effort=pb.REASONING_EFFORT_LOW
        ),
    )
    reasoning = "".join(r.delta.reasoning_text for r in out if r.HasField("delta"))
    answer = "".join(r.delta.text for r in out if r.HasField("delta"))
    final = out[-1].final
    assert final.decision.reasoning_effort == pb.REASONING_EFFORT_LOW and final.decision.reason == "requested low"
    assert final.usage.reasoning_tokens == BUDGET_LOW  # random weights never close the span: the budget does
    assert reasoning and answer
    assert "<think>" not in answer and "</think>" not in answer and "</think>" not in reasoning


def test_chat_and_token_id_prompts(ch):
    chat = pb.ChatMessages(
        messages=[
            pb.ChatMessage(role="user", content="Hi"),
            pb.ChatMessage(role="assistant", content="Hello"),
            pb.ChatMessage(role="user", content="Bye"),
        ]
    )
    out = generate(ch, pb.GenerateRequest(chat=chat, max_tokens=3, ignore_eos=True))
    assert out[-1].final.usage.completion_tokens == 3
    out = generate(
        ch, pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 22557, 1117]), max_tokens=3, ignore_eos=True)
    )
    assert out[-1].final.usage.prompt_tokens == 3


def test_logprobs_come_with_every_token_and_rank_the_greedy_choice_first(ch):
    out = generate(
        ch,
        pb.GenerateRequest(
            prompt="Hello there", max_tokens=6, temperature=0.0, logprobs=3, reasoning_effort=pb.REASONING_EFFORT_NONE
        ),
    )
    deltas = [r.delta for r in out if r.WhichOneof("kind") == "delta"]
    tokens = [t for d in deltas for t in d.token_ids]
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert len(tokens) == 6 and [lp.token_id for lp in logprobs] == tokens
    for lp in logprobs:
        assert len(lp.top) == 3 and lp.logprob <= 0
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.top[0].token_id == lp.token_id and lp.top[0].logprob == pytest.approx(lp.logprob)  # greedy
    plain = generate(ch, pb.GenerateRequest(prompt="Hello there", max_tokens=2, temperature=0.0))
    assert all(not r.delta.logprobs for r in plain if r.WhichOneof("kind") == "delta")


def test_list_models(ch, door):
    models = stub(ch).ListModels(pb.ListModelsRequest(), timeout=5).models
    assert [(m.name, m.architecture, m.ep_size) for m in models] == [(MODEL, "Mistral4ForCausalLM", 1)]
    assert models[0].max_model_len >= 500


def _with_bad_utf8(msg: pb.GenerateRequest, placeholder: str) -> bytes:
    raw = msg.SerializeToString()
    assert raw.count(placeholder.encode()) == 1
    return raw.replace(placeholder.encode(), b"\xff" * len(placeholder))


def _chat(*contents: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=c) for c in contents])


BAD_REQUESTS = {  # request -> how the details start (a str, or a pattern)
    "empty prompt": (pb.GenerateRequest(prompt=""), "prompt: must not be empty"),
    "chat ending with the assistant": (
        pb.GenerateRequest(
            chat=pb.ChatMessages(
                messages=[pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role="assistant", content="hello")]
            )
        ),
        "messages: the chat template rejected them",
    ),
    "two assistant turns in a row": (
        pb.GenerateRequest(
            chat=pb.ChatMessages(
                messages=[
                    pb.ChatMessage(role="user", content="hi"),
                    pb.ChatMessage(role="assistant", content="a"),
                    pb.ChatMessage(role="assistant", content="b"),
                ]
            )
        ),
        "messages: the chat template rejected them",
    ),
    "no prompt": (pb.GenerateRequest(max_tokens=3), "prompt: missing"),
    "prompt over the context": (
        pb.GenerateRequest(prompt="hello " * 1200),
        re.compile(r"prompt: \d+ tokens does not fit max_model_len"),
    ),
    "max_tokens 0": (pb.GenerateRequest(prompt="Hi", max_tokens=0), "max_tokens: must be in [1, "),
    "max_tokens over the context": (pb.GenerateRequest(prompt="Hi", max_tokens=5000), "max_tokens: must be in [1, "),
    "unknown model": (pb.GenerateRequest(prompt="Hi", model="gpt-5"), "model: unknown model 'gpt-5'"),
    "unknown effort": (pb.GenerateRequest(prompt="Hi", reasoning_effort=42), "reasoning_effort: unknown value 42"),
    "top_p 0": (pb.GenerateRequest(prompt="Hi", top_p=0.0), "top_p: must be in (0, 1]"),
    "empty stop string": (pb.GenerateRequest(prompt="Hi", stop=["ok", ""]), "stop: "),
    "bad role": (
        pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])),
        "chat.messages[0].role: ",
    ),
    "negative token id": (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, -4])), "prompt_token_ids.ids: "),
    "out-of-vocab token id": (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 10**9])), "prompt: "),
    "logprobs over the cap": (pb.GenerateRequest(prompt="Hi", logprobs=21), "logprobs: must be in [0, 20], got 21"),
    "bad UTF-8 in a chat message": (
        _with_bad_utf8(pb.GenerateRequest(chat=_chat("fine", "BAD!")), "BAD!"),
        "chat.messages[1].content: is not valid UTF-8",
    ),
    "bad UTF-8 in the prompt": (
        _with_bad_utf8(pb.GenerateRequest(prompt="BAD!"), "BAD!"),
        "prompt: is not valid UTF-8",
    ),
    "bad UTF-8 in a stop string": (
        _with_bad_utf8(pb.GenerateRequest(prompt="x", stop=["a", "BAD!"]), "BAD!"),
        "stop[1]: is not valid UTF-8",
    ),
    "not protobuf": (b"\x0a\xff\xff\xff", "request: not a valid levante.v1.GenerateRequest"),
    "oversized": (
        pb.GenerateRequest(prompt="x" * (MAX_REQUEST_BYTES + 10)),
        re.compile(r"request: \d+ bytes is over max_request_bytes 16384"),
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_naming_the_field(ch, loop, engine, name):
    req, details = BAD_REQUESTS[name]
    err = rpc_error(lambda: generate(ch, req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    matched = details.match(err.details()) if isinstance(details, re.Pattern) else err.details().startswith(details)
    assert matched, err.details()
    assert_still_serves(ch)
    assert stats(loop, engine).num_used_blocks == 0


def _generated(loop, engine) -> int:
    return stats(loop, engine).num_generated_tokens


def _assert_freed_early(loop, engine, before: int, max_tokens: int) -> None:
    wait_until(
        lambda: stats(loop, engine).num_used_blocks == 0 and stats(loop, engine).num_running == 0,
        timeout=5,
        what="the engine to free the aborted request",
    )
    assert _generated(loop, engine) - before < max_tokens  # stopped, not run to completion


def test_deadline_exceeded_aborts_the_engine_request(ch, loop, engine):
    before = _generated(loop, engine)
    req = pb.GenerateRequest(prompt="Hello", max_tokens=900, temperature=0, ignore_eos=True)
    err = rpc_error(lambda: generate(ch, req, timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_freed_early(loop, engine, before, 900)
    assert_still_serves(ch)


def test_client_cancel_aborts_the_engine_request(ch, loop, engine):
    before = _generated(loop, engine)
    call = stub(ch).Generate(pb.GenerateRequest(prompt="Hello", max_tokens=900, ignore_eos=True), timeout=30)
    for i, _ in enumerate(call):
        if i == 4:
            break
    assert stats(loop, engine).num_running == 1
    call.cancel()
    _assert_freed_early(loop, engine, before, 900)
    assert_still_serves(ch)


def test_many_concurrent_streams_all_finish(ch, loop, engine):
    from concurrent.futures import ThreadPoolExecutor

    req = pb.GenerateRequest(prompt="Hello", max_tokens=8, ignore_eos=True)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: generate(ch, req), range(6)))
    assert all(r[-1].final.usage.completion_tokens == 8 for r in results)
    assert len({r[0].start.request_id for r in results}) == 6
    wait_until(lambda: stats(loop, engine).num_used_blocks == 0, timeout=5, what="blocks freed")
