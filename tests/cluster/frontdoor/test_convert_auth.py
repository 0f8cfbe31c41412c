"""The pieces without a server: proto -> request defaults, UTF-8 field paths, token buckets, key lookup."""

from __future__ import annotations

import pytest

from cluster.config import FrontDoorConfig, InputLimitsConfig, TenantConfig
from cluster.frontdoor.auth import AuthError, LimitExceeded, Tenants, TokenBucket
from cluster.frontdoor.convert import (
    Limits,
    RequestError,
    ResponseEncoder,
    decode_generate,
    decode_response,
    encode_generate,
)
from cluster.frontdoor.errors import clip, short
from cluster.frontdoor.wire import find_invalid_utf8
from cluster.types import AUTO, Chunk, Decision, GenerateRequest, PrefillProgress, ServedBy
from engine.types import SamplingParams, Usage
from levante.v1 import inference_pb2 as pb

LIMITS = Limits("m", max_model_len=100, max_request_bytes=1000)


def decode(msg: pb.GenerateRequest):
    return decode_generate(msg.SerializeToString(), LIMITS)


def test_unset_fields_take_the_engine_defaults():
    req = decode(pb.GenerateRequest(prompt="hi"))
    assert req.params == SamplingParams()
    assert (req.model, req.reasoning_effort, req.preferred_region) == ("m", AUTO, None)


def test_set_fields_arrive_including_zero_values():
    req = decode(
        pb.GenerateRequest(
            prompt="hi",
            max_tokens=7,
            temperature=0.0,
            top_p=0.5,
            seed=0,
            top_k=3,
            stop=["x"],
            stop_token_ids=[2],
            ignore_eos=True,
            preferred_region="eu",
            reasoning_effort=pb.REASONING_EFFORT_HIGH,
            request_id="abc",
        )
    )
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.top_k, p.stop, p.stop_token_ids, p.ignore_eos) == (
        7,
        0.0,
        0.5,
        0,
        3,
        ("x",),
        (2,),
        True,
    )
    assert (req.reasoning_effort, req.preferred_region, req.request_id) == ("high", "eu", "abc")


@pytest.mark.parametrize(
    "effort, expected",
    [
        (pb.REASONING_EFFORT_UNSPECIFIED, AUTO),
        (pb.REASONING_EFFORT_AUTO, AUTO),
        (pb.REASONING_EFFORT_NONE, "none"),
        (pb.REASONING_EFFORT_MEDIUM, "medium"),
    ],
)
def test_effort_mapping(effort, expected):
    assert decode(pb.GenerateRequest(prompt="hi", reasoning_effort=effort)).reasoning_effort == expected


def test_request_id_must_be_short_and_printable():
    with pytest.raises(RequestError, match="^request_id: "):
        decode(pb.GenerateRequest(prompt="hi", request_id="x" * 129))
    with pytest.raises(RequestError, match="^request_id: "):
        decode(pb.GenerateRequest(prompt="hi", request_id="a\nb"))


@pytest.mark.parametrize(
    "msg, field",
    [
        (pb.GenerateRequest(prompt=""), "prompt"),
        (
            pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="")])),
            r"chat\.messages\[0\]\.content",
        ),
        (
            pb.GenerateRequest(
                chat=pb.ChatMessages(
                    messages=[pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user")]
                )
            ),
            r"chat\.messages\[1\]\.content",
        ),
    ],
)
def test_an_empty_prompt_is_refused_as_text_or_as_a_chat_message(msg, field):
    with pytest.raises(RequestError, match=f"^{field}: must not be empty$"):
        decode(msg)


CAPS = InputLimitsConfig(
    max_stop_strings=2,
    max_stop_string_chars=3,
    max_stop_token_ids=2,
    max_chat_messages=2,
    max_role_chars=9,
    max_model_name_chars=4,
    max_request_id_chars=5,
    max_logprobs=1,
)
CAPPED = Limits("m", max_model_len=100, max_request_bytes=10_000, inputs=CAPS)


def _msgs(n: int, role: str = "user") -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=role, content="hi") for _ in range(n)])


# (the field at its cap, the same field one past it, the refusal's field, the cap's config key)
AT_AND_PAST_CAPS = {
    "stop strings": (dict(stop=["a", "b"]), dict(stop=["a", "b", "c"]), "stop", "max_stop_strings"),
    "stop string chars": (dict(stop=["x", "abc"]), dict(stop=["x", "abcd"]), r"stop\[1\]", "max_stop_string_chars"),
    "stop token ids": (
        dict(stop_token_ids=[1, 2]),
        dict(stop_token_ids=[1, 2, 3]),
        "stop_token_ids",
        "max_stop_token_ids",
    ),
    "chat messages": (dict(chat=_msgs(2)), dict(chat=_msgs(3)), r"chat\.messages", "max_chat_messages"),
    "role chars": (
        dict(chat=_msgs(1, "assistant")),
        dict(chat=_msgs(1, "assistant!")),
        r"chat\.messages\[0\]\.role",
        "max_role_chars",
    ),
    "model name": (dict(model="m"), dict(model="mmmmm"), "model", "max_model_name_chars"),
    "request id": (dict(request_id="abcde"), dict(request_id="abcdef"), "request_id", "max_request_id_chars"),
    "logprobs": (dict(logprobs=1), dict(logprobs=2), "logprobs", "max_logprobs"),
}


@pytest.mark.parametrize("at, past, field, key", AT_AND_PAST_CAPS.values(), ids=AT_AND_PAST_CAPS.keys())
def test_each_cap_takes_its_limit_and_refuses_one_more_naming_the_field_and_the_key(at, past, field, key):
    def msg(fields):
        return pb.GenerateRequest(**({"prompt": "hi"} if "chat" not in fields else {}), **fields)

    decode_generate(msg(at).SerializeToString(), CAPPED)
    with pytest.raises(RequestError, match=rf"^{field}: .*\(frontdoor\.limits\.{key}\)"):
        decode_generate(msg(past).SerializeToString(), CAPPED)


def test_default_caps_fit_real_use_and_come_from_the_config():
    caps = Limits("m", 100, 1 << 20).inputs
    assert caps == InputLimitsConfig() == FrontDoorConfig().limits
    assert (caps.max_stop_strings, caps.max_stop_string_chars, caps.max_stop_token_ids) == (16, 256, 64)
    assert caps.max_chat_messages >= 100 and caps.max_request_id_chars == 128 and caps.max_logprobs == 20


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_stop_strings=-1), "max_stop_strings"),
        (dict(max_stop_string_chars=0), "max_stop_string_chars"),
        (dict(max_chat_messages=0), "max_chat_messages"),
        (dict(max_role_chars=8), "max_role_chars"),
        (dict(max_logprobs=-1), "max_logprobs"),
    ],
)
def test_input_limits_config_names_a_bad_key(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        InputLimitsConfig(**kwargs)


@pytest.mark.parametrize(
    "msg, field",
    [
        (pb.GenerateRequest(chat=_msgs(1, "robot" * 6)), "chat.messages[0].role"),  # under the cap, unknown
        (pb.GenerateRequest(prompt="hi", model="other" * 50), "model"),  # under the cap, unknown
        (pb.GenerateRequest(prompt="hi", request_id="\n" * 100), "request_id"),  # not printable
        (pb.GenerateRequest(prompt="hi", stop=["x" * 256] * 15 + [""]), "stop"),  # empty: SamplingParams' check
        (pb.GenerateRequest(prompt="hi", stop_token_ids=[7] * 63 + [-1]), "stop_token_ids"),  # negative
    ],
)
def test_refusals_echo_at_most_a_clipped_value(msg, field):
    with pytest.raises(RequestError) as e:
        decode_generate(msg.SerializeToString(), Limits("m", 100, 1 << 20))
    assert e.value.field == field and len(str(e.value)) <= 160, str(e.value)


def test_clip_keeps_short_values_and_cuts_long_ones_saying_their_size():
    assert clip("user") == "'user'" and clip(7) == "7"
    assert clip("x" * 900_000).startswith("'xxx") and clip("x" * 900_000).endswith("x... (900000 chars)")
    assert len(clip("x" * 900_000)) == 60 + len("... (900000 chars)")
    assert clip(tuple(range(300_000))).endswith("... (300000 items)") and len(clip(tuple(range(300_000)))) < 100
    assert len(clip("\x00" * 50)) < 100  # escapes make a repr longer than its value: cut as well
    assert short("f: " + "y" * 10_000).startswith("f: yyy") and len(short("f: " + "y" * 10_000)) <= 300


def test_a_temperature_below_the_floor_is_greedy():
    for t in (1e-300, 5e-324, 1e-6):
        params = decode(pb.GenerateRequest(prompt="hi", temperature=t)).params
        assert params.greedy and params.temperature == 0.0
    assert not decode(pb.GenerateRequest(prompt="hi", temperature=1e-4)).params.greedy


def test_invalid_utf8_path_counts_repeated_elements_and_skips_other_fields():
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=c) for c in ("a", "b", "ZZZ")])
    msg = pb.GenerateRequest(chat=chat, max_tokens=3, stop_token_ids=[1, 2], temperature=0.5, seed=9)
    raw = msg.SerializeToString().replace(b"ZZZ", b"\xc3\x28!")
    assert find_invalid_utf8(raw, pb.GenerateRequest.DESCRIPTOR) == "chat.messages[2].content"
    assert find_invalid_utf8(msg.SerializeToString(), pb.GenerateRequest.DESCRIPTOR) is None
    assert find_invalid_utf8(b"\x12\x7f", pb.GenerateRequest.DESCRIPTOR) is None  # truncated: malformed, not UTF-8


def test_encoder_sends_start_once_and_final_with_decision_and_served_by():
    enc = ResponseEncoder("rid")
    first = [pb.GenerateResponse.FromString(b) for b in enc.encode(Chunk(decision=Decision("low", "requested low")))]
    assert [m.WhichOneof("kind") for m in first] == ["start"]
    last = [
        pb.GenerateResponse.FromString(b)
        for b in enc.encode(
            Chunk(
                token_ids=[5],
                reasoning_text="t",
                finished=True,
                finish_reason="stop",
                usage=Usage(1, 2, 1, 0, "low"),
                served_by=ServedBy("eu", "r1"),
            )
        )
    ]
    assert [m.WhichOneof("kind") for m in last] == ["delta", "final"]
    final = last[1].final
    assert final.decision.reasoning_effort == pb.REASONING_EFFORT_LOW and final.served_by.region == "eu"
    assert (final.usage.reasoning_tokens, final.finish_reason, final.request_id) == (1, pb.FINISH_REASON_STOP, "rid")


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] = 0.49
    assert not bucket.take()
    now[0] = 0.5
    assert bucket.take() and not bucket.take()
    now[0] = 100.0  # saved tokens never exceed the burst
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_tenants_authenticate_and_limit_concurrency():
    tenants = Tenants.from_config([TenantConfig("a", api_key="k1", max_concurrency=1)], environ={})
    tenant = tenants.authenticate([("authorization", "Bearer k1")])
    assert tenant.name == "a"
    with pytest.raises(AuthError):
        tenants.authenticate([("authorization", "Bearer k2")])
    tenants.admit(tenant)
    with pytest.raises(LimitExceeded):
        tenants.admit(tenant)
    tenants.release(tenant)
    tenants.admit(tenant)


def test_duplicate_keys_are_rejected():
    with pytest.raises(ValueError, match=r"tenants\[1\] \('b'\)\.api_key: same key as tenant 'a'"):
        Tenants.from_config([TenantConfig("a", api_key="k"), TenantConfig("b", api_key_env="K")], environ={"K": "k"})


def test_without_tenants_everyone_is_anonymous():
    assert Tenants.from_config([], environ={}).authenticate([]).name == "anonymous"


def test_prefill_progress_goes_out_as_progress_to_a_caller_that_asked_and_comes_back_as_a_chunk():
    enc = ResponseEncoder("rid", progress=True)
    out = [pb.GenerateResponse.FromString(m) for m in enc.encode(Chunk(progress=PrefillProgress(64, 300)))]
    assert [m.WhichOneof("kind") for m in out] == ["start", "progress"]
    assert (out[1].progress.prompt_tokens_processed, out[1].progress.prompt_tokens) == (64, 300)
    back = decode_response(out[1].SerializeToString())
    assert back.progress == PrefillProgress(64, 300) and not back.token_ids and not back.finished
    beat = pb.GenerateResponse.FromString(enc.heartbeat())  # repeats the latest progress
    assert beat.progress.prompt_tokens_processed == 64
    # a heartbeat with nothing known, and a kind a later version may add: signs of life, never a Final
    unknown = decode_response(pb.GenerateResponse(progress=pb.Progress()).SerializeToString())
    assert unknown.progress is None and not unknown.token_ids and not unknown.finished
    assert not decode_response(pb.GenerateResponse().SerializeToString()).finished
    # a caller that did not ask gets the stream it always got
    quiet = ResponseEncoder("rid").encode(Chunk(progress=PrefillProgress(64, 300)))
    assert [pb.GenerateResponse.FromString(m).WhichOneof("kind") for m in quiet] == ["start"]


def test_a_region_calling_another_asks_for_progress():
    request = GenerateRequest("t/1", "m", "hi", SamplingParams(max_tokens=3), reasoning_effort="none")
    raw = encode_generate(request)
    assert pb.GenerateRequest.FromString(raw).stream_progress
    assert decode_generate(raw, Limits("m", 64, 1 << 20)).stream_progress
