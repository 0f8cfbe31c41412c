"""Fuzzing a live front door: property-based requests through a real grpc channel to a real front door over
a real (tiny MoE) engine, in this process.

Valid messages with extreme field values, raw bytes that are not protobuf, and valid messages with bytes
flipped or cut. Every call must end as ``decode_generate`` (the door's own check, run here as the oracle)
says: its refusal as INVALID_ARGUMENT with the same short details, or a whole stream (or an engine's
refusal of what only the model can judge, such as a prompt too long). Nothing crashes, the door stays
SERVING, and the engine's KV blocks come back after every call.
"""

from __future__ import annotations

import itertools
import logging
import math
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cluster.config import FrontDoorConfig
from cluster.frontdoor.convert import Limits, RequestError, decode_generate
from cluster.frontdoor.errors import MAX_DETAILS_CHARS, short
from engine.api import create_engine
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from levante.v1 import inference_pb2 as pb

from .harness import GENERATE, MODEL, channel, engine_backend, serving, spm_tokenizer, wait_until

pytestmark = pytest.mark.e2e
MAX_MODEL_LEN = 96  # a request the door lets through generates at most this many tokens
MAX_REQUEST_BYTES = 64 * 1024
# modest and reproducible: the same examples on every run, well under a minute on two busy cores
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values a valid request may carry, extremes first (hypothesis tries the listed ones early).
EXTREME_TEMPERATURE = st.sampled_from([0.0, 1e-300, 5e-324, 1e-5, 0.7, 2.0, 1e308]) | st.floats(0, 1e308)
EXTREME_TOP_P = st.sampled_from([1.0, 5e-324, 1e-300, 0.5]) | st.floats(5e-324, 1.0)
INT31 = st.sampled_from([0, 1, 32767, 32768, 2**31 - 1]) | st.integers(0, 2**31 - 1)
INT64 = st.sampled_from([0, -1, 2**63 - 1, -(2**63)]) | st.integers(-(2**63), 2**63 - 1)
SHORT_TEXT = st.text(min_size=1, max_size=12)
LONG_TEXT = st.builds(lambda c, n: c * n, st.characters(), st.integers(1, 3000))  # up to a few KB in UTF-8
_IDS = itertools.count()


def _unique(request_id: str) -> str:
    """A request id no earlier call used, so no call can meet a twin still finishing on the server."""
    return f"{next(_IDS)}:{request_id}"


PRINTABLE = st.text(st.characters(categories=["L", "N", "P", "S", "Zs"]), max_size=120).map(_unique)

# Values out of range or of the wrong shape, for one field at a time.
INT32 = st.sampled_from([0, -1, 2**31 - 1, -(2**31)]) | st.integers(-(2**31), 2**31 - 1)
FLOATS = st.sampled_from([-0.0, math.inf, -math.inf, math.nan, -1.0, 1.0 + 1e-15]) | st.floats()
TEXT = st.text(max_size=40) | LONG_TEXT
HOSTILE = {
    "max_tokens": st.sampled_from([0, -1, 2**31 - 1, MAX_MODEL_LEN + 1]) | INT32,
    "temperature": FLOATS,
    "top_p": FLOATS,
    "min_p": FLOATS,
    "top_k": INT32,
    "logprobs": INT32,
    "stop": st.lists(TEXT, max_size=20),
    "stop_token_ids": st.lists(INT32, max_size=70),
    "model": TEXT,
    "request_id": TEXT.map(_unique),
    "reasoning_effort": INT32,
    "prompt": st.just(""),
    "chat": st.lists(st.tuples(st.sampled_from(["", "tool", "USER", "r" * 40]) | TEXT, TEXT), max_size=4),
    "prompt_token_ids": st.lists(st.integers(0, 33000) | INT32, max_size=120),
}


def _set(msg: pb.GenerateRequest, name: str, value: object) -> None:
    if name == "chat":
        msg.chat.SetInParent()  # an empty chat is still a chat
        msg.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in value)  # type: ignore[attr-defined]
    elif name == "prompt_token_ids":
        msg.prompt_token_ids.SetInParent()
        msg.prompt_token_ids.ids.extend(value)  # type: ignore[arg-type]
    elif name in ("stop", "stop_token_ids"):
        getattr(msg, name).extend(value)
    else:
        setattr(msg, name, value)


@st.composite
def _valid(draw) -> pb.GenerateRequest:
    """Every field in range, at its extremes: the door takes it (the engine may still find a prompt too long)."""
    msg = pb.GenerateRequest(max_tokens=draw(st.integers(1, 3)), top_k=draw(INT31), min_p=draw(st.floats(0, 1)))
    kind = draw(st.sampled_from(["prompt", "chat", "prompt_token_ids"]))
    if kind == "prompt":
        msg.prompt = draw(SHORT_TEXT | LONG_TEXT)
    elif kind == "chat":
        roles = st.sampled_from(["system", "user", "assistant"])
        _set(msg, "chat", draw(st.lists(st.tuples(roles, SHORT_TEXT), min_size=1, max_size=3)))
    else:
        _set(msg, "prompt_token_ids", draw(st.lists(st.integers(0, 32767), min_size=1, max_size=50)))
    for name, values in (("temperature", EXTREME_TEMPERATURE), ("top_p", EXTREME_TOP_P), ("seed", INT64)):
        if draw(st.booleans()):
            setattr(msg, name, draw(values))
    if draw(st.booleans()):
        msg.logprobs = draw(st.integers(0, 20))
    _set(msg, "stop", draw(st.lists(SHORT_TEXT | st.text(min_size=256, max_size=256), max_size=16)))
    _set(msg, "stop_token_ids", draw(st.lists(INT31, max_size=64)))
    msg.model = draw(st.sampled_from(["", MODEL]))
    msg.request_id = draw(st.just("") | PRINTABLE)
    msg.reasoning_effort = draw(st.integers(0, 5))
    msg.ignore_eos, msg.stream_progress = draw(st.booleans()), draw(st.booleans())
    if draw(st.booleans()):
        msg.preferred_region = draw(TEXT)
    return msg


@st.composite
def _one_field_out_of_range(draw, name: str) -> pb.GenerateRequest:
    msg = draw(_valid())
    msg.ClearField(name)
    _set(msg, name, draw(HOSTILE[name]))
    return msg


@pytest.fixture(scope="module")
def engine(tiny_moe):
    eng = create_engine(
        EngineConfig(
            model=ModelConfig(model=tiny_moe, tokenizer=spm_tokenizer(), num_threads=1),
            cache=CacheConfig(num_blocks=32),
            scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN),
        )
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def door(engine, loop):
    backend = engine_backend(loop, engine)
    with serving(loop, backend, FrontDoorConfig(port=0, max_request_bytes=MAX_REQUEST_BYTES)) as d:
        yield d


@pytest.fixture(scope="module")
def ch(door):
    with channel(door) as c:
        yield c


@pytest.fixture
def check(ch, door, loop, engine, caplog):
    """A call's bytes -> the call made and judged, then the engine checked idle again."""
    limits = loop.run(door._limits())
    call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)  # bytes both ways
    caplog.set_level(logging.ERROR, logger="cluster")

    def one(raw: bytes) -> None:
        try:
            expected: str | None = short(str(_refusal(raw, limits)))
        except _Accepted:
            expected = None
        try:
            responses = [pb.GenerateResponse.FromString(r) for r in call(raw, timeout=30)]
        except grpc.RpcError as e:
            _judge_error(e, expected)
            event("refused by the door" if expected else "refused by the engine")  # --hypothesis-show-statistics
        else:
            assert expected is None, f"the door took what its own check refuses: {expected}"
            _judge_stream(responses)
            event("streamed")
        wait_until(lambda: _idle(loop, engine), timeout=10, what="the engine to free every KV block")

    yield one
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []  # nothing crashed


class _Accepted(Exception):
    pass


def _refusal(raw: bytes, limits: Limits) -> RequestError:
    try:
        decode_generate(raw, limits)
    except RequestError as e:
        return e
    raise _Accepted


def _judge_error(e: grpc.RpcError, expected: str | None) -> None:
    code, details = e.code(), e.details() or ""
    if expected is not None:
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
        return
    # what only the engine can judge (a prompt too long for the model, a token id past its vocabulary)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert re.match(r"^[a-z_.\[\]0-9]+: ", details) and len(details) <= MAX_DETAILS_CHARS, details


def _judge_stream(responses: list[pb.GenerateResponse]) -> None:
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds[0] == "start" and kinds[-1] == "final" and set(kinds[1:-1]) <= {"delta", "progress"}, kinds
    final = responses[-1].final
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    tokens = [t for r in responses if r.HasField("delta") for t in r.delta.token_ids]
    assert len(tokens) == final.usage.completion_tokens  # the stream is whole


def _idle(loop, engine) -> bool:
    stats = loop.run(engine.stats())
    return stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0


def _assert_serving(ch) -> None:
    health = health_pb2_grpc.HealthStub(ch)
    reply = health.Check(health_pb2.HealthCheckRequest(service="levante.v1.Inference"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_valid_messages_with_extreme_field_values(check, ch):
    @FUZZ
    @given(_valid())
    def run(msg: pb.GenerateRequest) -> None:
        check(msg.SerializeToString())

    run()
    _assert_serving(ch)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_one_field_out_of_range_or_of_the_wrong_shape(check, ch, name):
    @settings(FUZZ, max_examples=12)
    @given(_one_field_out_of_range(name))
    def run(msg: pb.GenerateRequest) -> None:
        check(msg.SerializeToString())

    run()
    _assert_serving(ch)


def test_bytes_that_are_not_a_valid_message(check, ch):
    @FUZZ
    @given(st.binary(max_size=300))
    def run(raw: bytes) -> None:
        check(raw)

    run()
    _assert_serving(ch)


def test_valid_messages_with_bytes_flipped_or_cut(check, ch):
    @FUZZ
    @given(_valid(), st.integers(0, 2**16), st.integers(1, 255), st.booleans())
    def run(msg: pb.GenerateRequest, at: int, xor: int, cut: bool) -> None:
        raw = bytearray(msg.SerializeToString())
        i = at % len(raw)
        raw = raw[:i] if cut else raw[:i] + bytes([raw[i] ^ xor]) + raw[i + 1 :]
        check(bytes(raw))

    run()
    _assert_serving(ch)


def test_a_vanishing_temperature_streams_the_greedy_answer(ch):
    """1e-300 once overflowed the logits to NaN; the argmax over NaN then picked token 0 every time."""

    def tokens(temperature: float) -> list[int]:
        msg = pb.GenerateRequest(prompt="Hello there", max_tokens=8, temperature=temperature, ignore_eos=True)
        out = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
        return [t for r in out(msg.SerializeToString(), timeout=30) if r.HasField("delta") for t in r.delta.token_ids]

    greedy = tokens(0.0)
    assert tokens(1e-300) == greedy and set(greedy) != {0}
