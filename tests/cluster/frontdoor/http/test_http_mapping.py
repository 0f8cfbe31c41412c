"""What an OpenAI request becomes at the backend, and what the backend's chunks become for the ``openai``
client: tools, tool_choice, response_format, tool and assistant messages, and streamed tool calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from cluster.types import Chunk, GenerateRequest
from engine.types import StructuredOutput, ToolCallDelta, ToolSpec, Usage

from ..harness import MODEL, ScriptedBackend, serving
from .harness import client

pytestmark = pytest.mark.e2e
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather now", "parameters": WEATHER}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


class CallsATool(ScriptedBackend):
    """Answers with a tool call whose arguments come in two pieces."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        yield Chunk(token_ids=[5], tool_calls=[ToolCallDelta(0, "call_9", "weather", '{"city": ')])
        yield Chunk(token_ids=[6], tool_calls=[ToolCallDelta(0, arguments='"Paris"}')])
        yield Chunk(finished=True, finish_reason="tool_calls", usage=Usage(7, 2, 0, 0, "none"))


def test_tools_tool_choice_response_format_and_messages_reach_the_backend(loop):
    backend = ScriptedBackend()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with serving(loop, backend) as door:
        c = client(door)
        c.chat.completions.create(
            model=MODEL,
            messages=CONVERSATION,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "weather"}},
        )
        c.chat.completions.create(
            model=MODEL,
            messages=CONVERSATION[:2],
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
        )
        c.chat.completions.create(model=MODEL, messages=CONVERSATION[:2], response_format={"type": "json_object"})
    tooled, schemed, json_object = (r.params for r in backend.requests)
    assert (
        tooled.tools == (ToolSpec("weather", "Weather now", json.dumps(WEATHER)),) and tooled.tool_choice == "weather"
    )
    assert backend.requests[0].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": CONVERSATION[2]["tool_calls"]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert schemed.structured == StructuredOutput("json_schema", json.dumps(schema), "a", True)
    assert json_object.structured == StructuredOutput("json_object", strict=False) and json_object.tools == ()


def test_tool_calls_come_back_whole_and_streamed_in_openais_shape(loop):
    with serving(loop, CallsATool()) as door:
        c = client(door)
        whole = c.chat.completions.create(model=MODEL, messages=CONVERSATION[:2], tools=TOOLS)
        events = list(c.chat.completions.create(model=MODEL, messages=CONVERSATION[:2], tools=TOOLS, stream=True))
    (call,) = whole.choices[0].message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call_9", "function", "weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    pieces = [d for e in events for d in e.choices[0].delta.tool_calls or ()]
    assert [(p.index, p.id, p.function.name) for p in pieces] == [(0, "call_9", "weather"), (0, None, None)]
    assert "".join(p.function.arguments for p in pieces) == '{"city": "Paris"}'
    assert events[-1].choices[0].finish_reason == "tool_calls"
