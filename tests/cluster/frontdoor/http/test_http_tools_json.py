"""Tool calls and structured outputs over HTTP, through the official ``openai`` client, on a real model.

The embedded SmolLM2-135M-Instruct, with a chat template that takes tools (its own does not), behind a
real front door: a forced call is a valid call the tool's schema accepts, the result goes back as a
``tool`` message, and the model answers; a ``json_schema`` answer validates with ``jsonschema``, whole
and streamed. The scripted round trip (the model's call written out as Mistral's tokens) is in
test_http_mapping.py's neighbour over gRPC; here everything is the model's own output.
"""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

from engine.api import create_engine
from engine.config import EngineConfig, ModelConfig
from levante.v1 import inference_pb2 as pb
from tests.engine.test_tool_rendering import HERMES_TEMPLATE

from ..harness import MODEL, channel, engine_backend, generate, serving
from .harness import client

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The current weather in a city", "parameters": WEATHER},
    }
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
WIND = {
    "type": "object",
    "properties": {
        "wind": {"enum": ["levante", "poniente", "tramontana"]},
        "gusts_kmh": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["wind", "gusts_kmh"],
    "additionalProperties": False,
}
WIND_FORMAT = {"type": "json_schema", "json_schema": {"name": "wind", "schema": WIND, "strict": True}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engine.checkpoint.gguf import default_model_path

    src, folder = default_model_path(), tmp_path_factory.mktemp("smollm-tools-http")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        os.symlink(os.path.join(src, name), folder / name)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    eng = create_engine(EngineConfig(model=ModelConfig(model=str(folder))))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def door(engine, loop):
    with serving(loop, engine_backend(loop, engine)) as d:
        yield d


@pytest.fixture(scope="module")
def oai(door):
    return client(door)


def test_a_tool_call_round_trip_with_a_scripted_tool(oai):
    first = oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=96, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.function.name == "get_weather" and c.id for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    results = [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"celsius": 22, "sky": "clear"})} for c in calls
    ]
    assistant = {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}
    second = oai.chat.completions.create(
        model=MODEL, messages=[*ASK, assistant, *results], tools=TOOLS, max_tokens=24, temperature=0
    )
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls"), answer
    assert answer.message.content or answer.message.tool_calls  # the model took the result and went on


def test_a_forced_call_streams_in_openai_shape(oai):
    whole = oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=96, temperature=0
    )
    events = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice=NAMED,
            max_tokens=96,
            temperature=0,
            stream=True,
        )
    )
    pieces: dict[int, dict] = {}
    for e in events:
        for d in (e.choices[0].delta.tool_calls or []) if e.choices else []:
            call = pieces.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or d.id
            call["name"] = call["name"] or (d.function.name if d.function else None)
            call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert events[-1].choices[0].finish_reason == "tool_calls"
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]
    assert [(p["name"], json.loads(p["arguments"])) for p in pieces.values()] == expected
    assert all(p["id"] for p in pieces.values())


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=5)])
def test_a_json_schema_answer_validates_whole_and_streamed(oai, sampling):
    ask = [{"role": "user", "content": "Which wind blows in Tarifa today, and how strong are its gusts?"}]
    whole = oai.chat.completions.create(
        model=MODEL, messages=ask, response_format=WIND_FORMAT, max_tokens=64, **sampling
    )
    assert whole.choices[0].finish_reason == "stop", whole
    jsonschema.validate(json.loads(whole.choices[0].message.content), WIND)
    streamed = oai.chat.completions.create(
        model=MODEL, messages=ask, response_format=WIND_FORMAT, max_tokens=64, stream=True, **sampling
    )
    text = "".join(e.choices[0].delta.content or "" for e in streamed if e.choices)
    assert text == whole.choices[0].message.content


def test_json_object_is_an_object(oai):
    out = oai.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=96, temperature=0
    )
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].message.content), dict)


def test_a_schema_the_grammar_engine_refuses_is_a_400_naming_it(oai):
    import openai

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=ASK, response_format=bad, max_tokens=8)
    assert err.value.body["param"] == "response_format.json_schema", err.value.body
    ok = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason == "length"  # the server stays up


def test_the_same_forced_call_and_json_schema_over_grpc(door, oai):
    """gRPC and HTTP are two doors to one call path: the same requests give the same calls and JSON."""
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=ASK[0]["content"])])
    tool = pb.Tool(name="get_weather", description="The current weather in a city", parameters=json.dumps(WEATHER))
    with channel(door) as ch:
        out = generate(
            ch, pb.GenerateRequest(chat=chat, tools=[tool], tool_choice="get_weather", max_tokens=96, temperature=0)
        )
        wind = generate(
            ch,
            pb.GenerateRequest(
                chat=chat,
                max_tokens=64,
                temperature=0,
                response_format=pb.ResponseFormat(type="json_schema", json_schema=json.dumps(WIND), name="wind"),
            ),
        )
    calls: dict[int, dict] = {}
    for d in (r.delta for r in out if r.HasField("delta")):
        for c in d.tool_calls:
            call = calls.setdefault(c.index, {"name": c.name, "arguments": ""})
            call["arguments"] += c.arguments
    assert out[-1].final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    http = oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=96, temperature=0
    )
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in http.choices[0].message.tool_calls]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == expected
    for _, arguments in expected:
        jsonschema.validate(arguments, WEATHER)
    text = "".join(r.delta.text for r in wind if r.HasField("delta"))
    assert wind[-1].final.finish_reason == pb.FINISH_REASON_STOP
    jsonschema.validate(json.loads(text), WIND)
    again = oai.chat.completions.create(
        model=MODEL, messages=ASK, response_format=WIND_FORMAT, max_tokens=64, temperature=0
    )
    assert again.choices[0].message.content == text
