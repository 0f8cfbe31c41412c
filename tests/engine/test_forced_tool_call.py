"""Forced tool calls end to end: a real model, ``tool_choice`` "required" or a tool's name, and the output a
valid call whose arguments the tool's schema accepts.

The forced call sets ``SamplingParams.structured`` to the call-list schema
(``engine.toolcalls.forced_call_schema``); the engines enforce it with
grammar-constrained decoding. The model is the embedded SmolLM2-135M-Instruct
with a chat template that takes tools (its own does not), so the prompt shows
the tools and the grammar makes the output a call.
"""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

from engine.core.request import SamplingParams, ToolSpec
from engine.llm import LLM

from .test_tool_rendering import HERMES_TEMPLATE

pytestmark = pytest.mark.slow

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = (
    ToolSpec("get_weather", "The current weather in a city", json.dumps(WEATHER_SCHEMA)),
    ToolSpec("add", "Add two integers", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})),
)
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from engine.checkpoint.gguf import default_model_path

    src = default_model_path()
    folder = tmp_path_factory.mktemp("smollm-tools")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        os.symlink(os.path.join(src, name), folder / name)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return LLM(str(folder))


@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_a_forced_call_is_a_valid_call(llm, choice):
    params = SamplingParams(temperature=0, max_tokens=96, tools=TOOLS, tool_choice=choice)
    out = llm.chat(ASK, params)[0]
    assert out.finish_reason == "tool_calls", f"{out.finish_reason}: {out.text!r}"
    assert out.text == "" and out.tool_calls
    for call in out.tool_calls:
        assert call.name in ("get_weather", "add") and (choice == "required" or call.name == choice)
        schema = next(json.loads(t.parameters) for t in TOOLS if t.name == call.name)
        jsonschema.validate(json.loads(call.arguments), schema)
    if choice != "required":
        assert len(out.tool_calls) == 1
