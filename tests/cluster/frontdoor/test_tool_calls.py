"""Tool calls over gRPC: the proto fields, their checks and caps, and a round trip through a real front door.

The round trip's model is scripted (a random tiny model never calls a tool),
everything else is real: the front door decodes the request, the engine's
admission renders the conversation with mistral-common (compared with its
own encode), the shared output state parses the scripted tokens, and the
answers come back through the gRPC stub and through ``RegionClient``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from cluster.backends.failover import _Progress, _Replay
from cluster.config import FrontDoorConfig, InputLimitsConfig
from cluster.frontdoor.convert import (
    Limits,
    RequestError,
    ResponseEncoder,
    decode_generate,
    decode_response,
    encode_generate,
)
from cluster.regions.region_client import RegionClient, collect
from cluster.types import Chunk
from engine.admission import Admission
from engine.config import ReasoningConfig
from engine.reasoning import ThinkMarkers
from engine.tokenizer import load_tokenizer
from engine.types import (
    EngineClient,
    EngineInfo,
    EngineStats,
    RequestDelta,
    SamplingParams,
    ToolCallDelta,
    ToolSpec,
)
from levante.v1 import inference_pb2 as pb

from .harness import LoopThread, channel, engine_backend, generate, rpc_error, serving, spm_tokenizer

LIMITS = Limits("m", max_model_len=4096, max_request_bytes=1 << 20)
WEATHER_SCHEMA = json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
WEATHER = pb.Tool(name="get_weather", description="The weather in a city", parameters=WEATHER_SCHEMA)


def decode(msg: pb.GenerateRequest, limits: Limits = LIMITS):
    return decode_generate(msg.SerializeToString(), limits)


def chat(*messages: pb.ChatMessage) -> pb.ChatMessages:
    return pb.ChatMessages(messages=list(messages))


ASKED = pb.ChatMessage(role="user", content="Weather in Paris?")
CALLED = pb.ChatMessage(
    role="assistant", tool_calls=[pb.ToolCall(id="abcDEF123", name="get_weather", arguments='{"city": "Paris"}')]
)
ANSWERED = pb.ChatMessage(role="tool", tool_call_id="abcDEF123", name="get_weather", content='{"celsius": 22}')


def test_tools_and_tool_messages_decode_to_the_engine_vocabulary():
    req = decode(pb.GenerateRequest(chat=chat(ASKED, CALLED, ANSWERED), tools=[WEATHER], tool_choice="required"))
    assert req.params.tools == (ToolSpec("get_weather", "The weather in a city", WEATHER_SCHEMA),)
    assert req.params.tool_choice == "required"
    assert req.prompt[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "abcDEF123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert req.prompt[2] == {
        "role": "tool",
        "content": '{"celsius": 22}',
        "tool_call_id": "abcDEF123",
        "name": "get_weather",
    }
    assert decode(pb.GenerateRequest(prompt="hi", tools=[WEATHER])).params.tool_choice is None  # "": auto


def test_a_request_with_tools_survives_the_hop_to_a_peer():
    req = decode(pb.GenerateRequest(chat=chat(ASKED, CALLED, ANSWERED), tools=[WEATHER], tool_choice="get_weather"))
    again = decode_generate(encode_generate(req), LIMITS)
    assert again.prompt == req.prompt and again.params == req.params


@pytest.mark.parametrize(
    "msg,field",
    [
        (pb.GenerateRequest(chat=chat(pb.ChatMessage(role="tool", content="x"))), "chat.messages[0].tool_call_id"),
        (pb.GenerateRequest(chat=chat(pb.ChatMessage(role="user", content="x", tool_call_id="a"))), "tool_call_id"),
        (pb.GenerateRequest(chat=chat(pb.ChatMessage(role="user", tool_calls=CALLED.tool_calls))), "tool_calls"),
        (pb.GenerateRequest(chat=chat(pb.ChatMessage(role="assistant"))), "chat.messages[0].content"),
        (
            pb.GenerateRequest(
                chat=chat(pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="a", name="f", arguments="[1")]))
            ),
            "chat.messages[0].tool_calls[0].arguments",
        ),
        (
            pb.GenerateRequest(chat=chat(pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(name="f")]))),
            "chat.messages[0].tool_calls[0].id",
        ),
        (pb.GenerateRequest(prompt="hi", tools=[pb.Tool(name="f", parameters="[]")]), "tools[0].parameters"),
        (pb.GenerateRequest(prompt="hi", tools=[pb.Tool(parameters="{}")]), "tools[0].name"),
        (pb.GenerateRequest(prompt="hi", tools=[WEATHER, WEATHER]), "tools"),
        (pb.GenerateRequest(prompt="hi", tools=[WEATHER], tool_choice="other"), "tool_choice"),
        (pb.GenerateRequest(prompt="hi", tool_choice="required"), "tool_choice"),
    ],
)
def test_bad_tool_input_names_the_field(msg, field):
    with pytest.raises(RequestError) as e:
        decode(msg)
    assert e.value.field.endswith(field), str(e.value)


def test_tool_caps_name_their_config_key():
    limits = Limits("m", 100, 1 << 20, InputLimitsConfig(max_tools=1, max_tool_schema_chars=40))
    with pytest.raises(RequestError, match=r"^tools: at most 1 tools \(frontdoor.limits.max_tools\), got 2"):
        decode(pb.GenerateRequest(prompt="hi", tools=[WEATHER, pb.Tool(name="g")]), limits)
    with pytest.raises(RequestError, match=r"^tools\[0\]: at most 40 characters \(frontdoor.limits.max_tool_sch"):
        decode(pb.GenerateRequest(prompt="hi", tools=[WEATHER]), limits)


def test_tool_call_deltas_and_reasons_go_out_and_come_back():
    calls = [ToolCallDelta(0, "abcDEF123", "get_weather", ""), ToolCallDelta(0, arguments='{"city": ')]
    enc = ResponseEncoder("r")
    out = enc.encode(Chunk(token_ids=[5, 6], tool_calls=calls))
    out += enc.encode(
        Chunk(tool_calls=[ToolCallDelta(0, arguments='"Paris"}')], finished=True, finish_reason="tool_calls")
    )
    chunks = [decode_response(raw) for raw in out]
    got = [c for chunk in chunks for c in chunk.tool_calls or ()]
    assert got == calls + [ToolCallDelta(0, arguments='"Paris"}')]
    assert chunks[-1].finish_reason == "tool_calls"
    final = ResponseEncoder("r").encode(Chunk(finished=True, finish_reason="malformed_tool_call"))[-1]
    assert pb.GenerateResponse.FromString(final).final.finish_reason == pb.FINISH_REASON_MALFORMED_TOOL_CALL
    assert decode_response(final).finish_reason == "malformed_tool_call"


def test_a_replay_drops_the_tool_call_pieces_the_caller_has():
    progress = _Progress(None)
    progress.pass_on(Chunk(token_ids=[1, 2], tool_calls=[ToolCallDelta(0, "first0001", "f", '{"a"')]))
    replay = _Replay(progress, "next")
    # the replay makes its own id and splits the arguments elsewhere: the caller keeps its id, gets the rest once
    chunk = replay.trim(Chunk(token_ids=[1], tool_calls=[ToolCallDelta(0, "other0002", "f", '{"')]))
    assert chunk.tool_calls is None and chunk.token_ids == []
    chunk = replay.trim(Chunk(token_ids=[2, 3], tool_calls=[ToolCallDelta(0, arguments='a": 1}')]))
    assert chunk.tool_calls == [ToolCallDelta(0, arguments=": 1}")] and chunk.token_ids == [3]


# ---- a round trip through a real front door ------------------------------------------------------


class ScriptedToolModel(EngineClient):
    """An engine whose model is a script: asked, it calls get_weather; given the result, it answers.

    Admission (rendering, limits) and the output state (the tool-call parser) are the engines' own.
    """

    def __init__(self) -> None:
        tok = load_tokenizer(spm_tokenizer())
        self.tok = tok
        self.admission = Admission(
            tok, tok.vocab_size, [tok.eos_token_id], ThinkMarkers((), ()), ReasoningConfig(), 4096
        )
        self.prompts: list[list[int]] = []
        self._states: dict = {}

    def script(self, prompt) -> list[int]:
        if prompt[-1]["role"] == "tool":
            return self.tok.encode("It is 22 degrees in Paris.", add_special_tokens=False)
        call = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
        return [self.tok.special_token_id("[TOOL_CALLS]")] + self.tok.encode(call, add_special_tokens=False)

    async def submit(self, request_id, prompt, params: SamplingParams, resume=None) -> None:
        admitted = self.admission.admit(request_id, prompt, params, resume)
        self.prompts.append(admitted.prompt_ids)
        self._states[request_id] = (admitted.state, self.script(prompt))

    async def stream(self, request_id: str) -> AsyncIterator[RequestDelta]:
        state, tokens = self._states.pop(request_id)
        for t in tokens:
            yield state.add_tokens([t], None)
        yield state.finish("stop")

    async def abort(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    async def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 16, 1, 0, 0, 0, 0, 0.0, 0.0, 0, 0)

    async def health(self) -> bool:
        return True

    async def info(self) -> EngineInfo:
        return EngineInfo("scripted", "Scripted", 4096, self.tok.vocab_size)


@pytest.fixture(scope="module")
def door():
    loop = LoopThread()
    model = ScriptedToolModel()
    with serving(loop, engine_backend(loop, model), FrontDoorConfig(port=0)) as d:
        yield d, model
    loop.close()


def _calls(responses) -> list[ToolCallDelta]:
    deltas = [c for r in responses if r.WhichOneof("kind") == "delta" for c in r.delta.tool_calls]
    merged: dict[int, dict] = {}
    for d in deltas:
        merged.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})["arguments"] += d.arguments
    return list(merged.values())


def test_round_trip_over_grpc_with_a_scripted_tool(door):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    d, model = door
    ch = channel(d)
    first = generate(ch, pb.GenerateRequest(chat=chat(ASKED), tools=[WEATHER], max_tokens=64))
    assert first[-1].final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    [call] = _calls(first)
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert "".join(r.delta.text for r in first if r.WhichOneof("kind") == "delta") == ""

    result = json.dumps({"celsius": 22})  # the scripted tool, run by the client
    called = pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(**call)])
    answered = pb.ChatMessage(role="tool", tool_call_id=call["id"], content=result)
    second = generate(ch, pb.GenerateRequest(chat=chat(ASKED, called, answered), tools=[WEATHER], max_tokens=64))
    assert second[-1].final.finish_reason == pb.FINISH_REASON_STOP
    assert "".join(r.delta.text for r in second if r.WhichOneof("kind") == "delta") == "It is 22 degrees in Paris."
    assert _calls(second) == []

    # the model saw the call and its result as mistral-common renders them
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": WEATHER.description,
                "parameters": json.loads(WEATHER_SCHEMA),
            },
        }
    ]
    messages = [
        {"role": "user", "content": ASKED.content},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": result},
    ]
    reference = MistralTokenizer.from_file(spm_tokenizer()).encode_chat_completion(
        ChatCompletionRequest.from_openai(messages, tools=tools)
    )
    assert model.prompts[-1] == reference.tokens


def test_round_trip_through_the_client_library(door):
    d, _ = door
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": json.loads(WEATHER_SCHEMA)}}

    async def run():
        async with RegionClient([f"r=localhost:{d.port}"]) as client:
            asked = [{"role": "user", "content": "Weather in Paris?"}]
            first = await collect(client.generate(asked, tools=[tool], max_tokens=64))
            [call] = first.tool_calls
            assistant = {
                "role": "assistant",
                "content": first.text,
                "tool_calls": [
                    {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                ],
            }
            result = {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 22}'}
            second = await collect(client.generate(asked + [assistant, result], tools=[tool], max_tokens=64))
            return first, second

    first, second = asyncio.run(run())
    assert first.final.finish_reason == "tool_calls" and first.final.error is None
    assert json.loads(first.tool_calls[0].arguments) == {"city": "Paris"} and len(first.tool_calls[0].id) == 9
    assert second.final.finish_reason == "stop" and second.text == "It is 22 degrees in Paris."


def test_tools_with_a_plain_prompt_are_refused_and_the_server_stays_up(door):
    d, _ = door
    ch = channel(d)
    # a plain-text prompt cannot show tools to the model: refused naming the field
    e = rpc_error(lambda: generate(ch, pb.GenerateRequest(prompt="hi", tools=[WEATHER])))
    assert e.code().name == "INVALID_ARGUMENT" and e.details().startswith("tools: ")
    ok = generate(ch, pb.GenerateRequest(chat=chat(ASKED), max_tokens=8))
    assert ok[-1].WhichOneof("kind") == "final"
