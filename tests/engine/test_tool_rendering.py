"""Tools in the prompt, against the reference renderers, and tool calls through a request's output state.

Rendering: mistral-common's own encode of the same conversation built from
its request objects; a Hugging Face chat template through transformers'
``apply_chat_template``. Output: a scripted model's token ids, fed one at a
time through the ``RequestState`` that both engines use.
"""

from __future__ import annotations

import json
import shutil

import pytest

from engine.admission import Admission
from engine.config import ReasoningConfig
from engine.core.request import SamplingParams, ToolSpec
from engine.output import collect_output
from engine.reasoning import ThinkMarkers
from engine.tokenizer import HFTokenizer, load_tokenizer, resolve_tokenizer_path
from engine.types import EngineError

WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
)
ADD = ToolSpec("add", "Add two numbers", json.dumps({"type": "object", "properties": {"a": {}, "b": {}}}))
CALL_ID = "abcDEF123"
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": '{"celsius": 22}'},
]
MISTRAL_FILES = ["mistral_instruct_tokenizer_240323.model.v3", "mistral_instruct_tokenizer_241114.model.v7"]
MISTRAL_FILES += ["tekken_240911.json"]


def mistral(file: str):
    return load_tokenizer(resolve_tokenizer_path(f"mistral-common:{file}"))


@pytest.mark.parametrize("file", MISTRAL_FILES)
def test_mistral_rendering_matches_mistral_common(file):
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = ChatCompletionRequest(
        messages=[
            UserMessage(content="What is the weather in Paris?"),
            AssistantMessage(
                tool_calls=[
                    ToolCall(id=CALL_ID, function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
                ]
            ),
            ToolMessage(tool_call_id=CALL_ID, content='{"celsius": 22}'),
        ],
        tools=[
            Tool(function=Function(name=t.name, description=t.description, parameters=json.loads(t.parameters)))
            for t in (WEATHER, ADD)
        ],
    )
    expected = MistralTokenizer.from_file(resolve_tokenizer_path(f"mistral-common:{file}"))
    ids = mistral(file).apply_chat_template(CONVERSATION, tools=(WEATHER, ADD))
    assert ids == expected.encode_chat_completion(reference).tokens
    assert ids != mistral(file).apply_chat_template(CONVERSATION[:1])  # the tools and the call are in it


HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response name="{{ message.name }}">
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def smollm_dir():
    from engine.checkpoint.gguf import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def hermes_dir(smollm_dir, tmp_path_factory):
    """SmolLM2's tokenizer with a chat template that takes tools (SmolLM2's own does not)."""
    folder = tmp_path_factory.mktemp("hermes")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smollm_dir}/{name}", folder / name)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return str(folder)


def test_hf_rendering_matches_transformers(hermes_dir):
    from transformers import AutoTokenizer

    tok = HFTokenizer(hermes_dir)
    assert tok.tool_call_format == "hermes"
    ids = tok.apply_chat_template(CONVERSATION, tools=(WEATHER, ADD))
    reference = AutoTokenizer.from_pretrained(hermes_dir)
    # transformers' documented shape: arguments as an object, and the tool result naming its function
    messages = [
        CONVERSATION[0],
        {
            **CONVERSATION[1],
            "content": "",
            "tool_calls": [
                {
                    **CONVERSATION[1]["tool_calls"][0],
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {**CONVERSATION[2], "name": "get_weather"},
    ]
    tools = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": json.loads(t.parameters)},
        }
        for t in (WEATHER, ADD)
    ]
    expected = reference.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    text = tok.decode(ids, skip_special_tokens=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '"description": "The weather in a city"' in text and '<tool_response name="get_weather">' in text


def test_template_without_tools_is_refused_naming_tools(smollm_dir):
    tok = HFTokenizer(smollm_dir)  # SmolLM2-135M-Instruct: its template never looks at tools
    assert tok.tool_call_format is None
    with pytest.raises(ValueError, match="^tools: "):
        tok.apply_chat_template(CONVERSATION[:1], tools=(WEATHER,))
    with pytest.raises(ValueError, match="^tools: "):
        tok.apply_chat_template(CONVERSATION)  # the call and its result would vanish from the prompt
    assert tok.apply_chat_template(CONVERSATION[:1])  # without tools it renders as before
    with pytest.raises(EngineError) as e:
        admission(tok).admit("r", CONVERSATION[:1], SamplingParams(tools=(WEATHER,)), None)
    assert e.value.field == "tools"


def admission(tok) -> Admission:
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return Admission(tok, tok.vocab_size, eos, ThinkMarkers((), ()), ReasoningConfig(), 4096)


def run_scripted(tok, params: SamplingParams, output_ids: list[int], reason: str = "stop"):
    """A scripted model: ``output_ids`` go through the request's state one token at a time."""
    admitted = admission(tok).admit("r", CONVERSATION[:1], params, None)
    deltas = [admitted.state.add_tokens([t], None) for t in output_ids]
    deltas.append(admitted.state.finish(reason))
    return admitted, deltas, collect_output(admitted.prompt_ids, admitted.params, deltas)


@pytest.mark.parametrize("file", ["tekken_240911.json", "mistral_instruct_tokenizer_240323.model.v3"])
def test_mistral_call_streams_out_of_the_text(file):
    tok = mistral(file)
    body = tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', add_special_tokens=False)
    output = tok.encode("Checking.", add_special_tokens=False) + [tok.special_token_id("[TOOL_CALLS]")] + body
    _, deltas, out = run_scripted(tok, SamplingParams(tools=(WEATHER, ADD)), output)
    assert out.text == "Checking." and out.finish_reason == "tool_calls"
    [call] = out.tool_calls
    assert call.name == "get_weather" and len(call.id) == 9 and json.loads(call.arguments) == {"city": "Paris"}
    assert out.token_ids == output  # the tokens themselves are all there, for resume
    # the same through to_output, as the vLLM backend's offline API reads it
    assert sum(1 for d in deltas if d.tool_calls) == 1


def test_hermes_call_and_malformed_call(hermes_dir):
    tok = HFTokenizer(hermes_dir)
    text = 'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    _, _, out = run_scripted(tok, SamplingParams(tools=(WEATHER, ADD)), tok.encode(text, add_special_tokens=False))
    assert out.text == "Sure." and out.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("add", {"a": 1, "b": 2})]
    bad = '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>'
    _, _, out = run_scripted(tok, SamplingParams(tools=(WEATHER, ADD)), tok.encode(bad, add_special_tokens=False))
    assert out.finish_reason == "malformed_tool_call" and out.text == bad and out.tool_calls == []


def test_tool_choice_none_parses_nothing(hermes_dir):
    tok = HFTokenizer(hermes_dir)
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call>'
    params = SamplingParams(tools=(WEATHER, ADD), tool_choice="none")
    _, _, out = run_scripted(tok, params, tok.encode(text, add_special_tokens=False))
    assert out.text == text and out.finish_reason == "stop" and out.tool_calls is None


@pytest.mark.parametrize("choice,names", [("required", ["get_weather", "add"]), ("add", ["add"])])
def test_forced_call_sets_the_schema_and_parses_json(hermes_dir, choice, names):
    import jsonschema

    tok = HFTokenizer(hermes_dir)
    text = '[{"name": "add", "arguments": {"a": 1}}]'
    admitted, _, out = run_scripted(
        tok, SamplingParams(tools=(WEATHER, ADD), tool_choice=choice), tok.encode(text, add_special_tokens=False)
    )
    structured = admitted.params.structured
    assert structured is not None and structured.kind == "json_schema"
    schema = json.loads(structured.schema)
    assert [v["properties"]["name"]["const"] for v in schema["items"]["anyOf"]] == names
    jsonschema.validate(json.loads(text), schema)
    assert out.finish_reason == "tool_calls" and out.text == ""
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("add", {"a": 1})]


def test_tool_input_errors_name_the_field(hermes_dir):
    from engine.core.request import StructuredOutput

    tok = HFTokenizer(hermes_dir)
    with pytest.raises(EngineError) as e:
        admission(tok).admit("r", "plain text", SamplingParams(tools=(WEATHER,)), None)
    assert e.value.field == "tools"
    with pytest.raises(EngineError) as e:
        admission(tok).admit("r", CONVERSATION[:1], SamplingParams(tools=(ToolSpec("f", "", "[1"),)), None)
    assert e.value.field == "tools.parameters"
    params = SamplingParams(tools=(WEATHER,), tool_choice="required", structured=StructuredOutput("json_object"))
    with pytest.raises(EngineError) as e:
        admission(tok).admit("r", CONVERSATION[:1], params, None)
    assert e.value.field == "tool_choice"


@pytest.mark.parametrize("cut", [1, 3, 8, 15])
def test_a_resumed_request_continues_its_call(cut):
    """Another engine sent the first ``cut`` tokens' deltas; this one replays them silently and sends the rest."""
    from engine.types import Resume, merge_tool_calls

    tok = mistral("tekken_240911.json")
    body = tok.encode('[{"name": "add", "arguments": {"a": 1, "b": [2, 3]}}]', add_special_tokens=False)
    output = tok.encode("Sum:", add_special_tokens=False) + [tok.special_token_id("[TOOL_CALLS]")] + body
    params = SamplingParams(tools=(WEATHER, ADD), max_tokens=64)
    _, first, _ = run_scripted(tok, params, output[:cut])
    sent = first[:-1]  # what the client got before the break (the final delta never came)
    resume = Resume(tuple(output[:cut]), text_chars=sum(len(d.text) for d in sent))
    admitted = admission(tok).admit("r2", CONVERSATION[:1], params, resume)
    rest = [admitted.state.add_tokens([t], None) for t in output[cut:]] + [admitted.state.finish("stop")]
    deltas = sent + rest
    assert "".join(d.text for d in deltas) == "Sum:" and rest[-1].finish_reason == "tool_calls"
    [call] = merge_tool_calls([c for d in deltas for c in d.tool_calls or ()])
    assert call.name == "add" and json.loads(call.arguments) == {"a": 1, "b": [2, 3]}
