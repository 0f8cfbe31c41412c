"""The incremental tool-call parser: every format, fed whole, one character at a time and split at every
boundary, and its malformed cases; and the forced-call schema."""

from __future__ import annotations

import itertools
import json

import jsonschema
import pytest

from engine.core.request import ToolSpec
from engine.toolcalls import MALFORMED_REASON, ToolCallParser, final_reason, forced_call_schema

NAMES = ("get_weather", "add")
WEATHER = '{"city": "Paris", "note": "brackets ] } [ { and \\" inside a string"}'


def _ids():
    counter = itertools.count()
    return lambda: f"id{next(counter):07d}"


def run(fmt: str, pieces: list[str]) -> tuple[str, list, ToolCallParser]:
    parser = ToolCallParser(fmt, NAMES, new_id=_ids())
    text, calls = "", []
    for p in pieces:
        out = parser.feed(p)
        text, calls = text + out.text, calls + out.calls
    out = parser.finish()
    return text + out.text, calls + out.calls, parser


def merged(calls) -> list[dict]:
    """The deltas added up per call, checking that id and name come first and once."""
    by_index: dict[int, dict] = {}
    for d in calls:
        if d.index not in by_index:
            assert d.id and d.name, f"first delta of call {d.index} lacks id or name: {d}"
            by_index[d.index] = {"id": d.id, "name": d.name, "arguments": d.arguments}
        else:
            assert d.id is None and d.name is None
            by_index[d.index]["arguments"] += d.arguments
    assert sorted(by_index) == list(range(len(by_index)))
    return [by_index[i] for i in sorted(by_index)]


def splits(text: str):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


CASES = {
    "mistral v11": (
        "mistral",
        f'Let me check.[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]add[ARGS]{{"a": 1, "b": 2}}',
        "Let me check.",
    ),
    "mistral call ids": ("mistral", '[TOOL_CALLS]add[CALL_ID]abcDEF123[ARGS]{"a": 1}', ""),
    "mistral list": (
        "mistral",
        (
            f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}, "id": "abcDEF123"}}, '
            '{"name": "add", "arguments": {"a": [1, {"b": "]}"}]}}]'
        ),
        "",
    ),
    "hermes": (
        "hermes",
        (
            f'Sure.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
        ),
        "Sure.\n\n",
    ),
    "json list": ("json", f' [{{"name": "get_weather", "arguments": {WEATHER}}}]\n', ""),
    "json object": ("json", '{"name": "add", "parameters": "{\\"a\\": 1}"}', ""),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_every_split_gives_the_same_calls(case):
    fmt, text, content = CASES[case]
    expected = None
    for pieces in splits(text):
        got_text, calls, parser = run(fmt, pieces)
        assert parser.error is None, (pieces, parser.error)
        calls = merged(calls)
        assert got_text == content, pieces
        for c in calls:
            assert isinstance(json.loads(c["arguments"]), dict)
        expected = expected or calls
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            (c["name"], json.loads(c["arguments"])) for c in expected
        ]
    assert [c["name"] for c in expected] == [n for n in ("get_weather", "add") if n in text]


def test_ids_the_model_wrote_are_kept():
    _, calls, _ = run("mistral", list(CASES["mistral call ids"][1]))
    assert merged(calls)[0]["id"] == "abcDEF123"
    _, calls, _ = run("mistral", [CASES["mistral list"][1]])
    assert merged(calls)[0]["id"] == "abcDEF123" and merged(calls)[1]["id"] == "id0000000"


def test_mistral_arguments_stream_token_by_token():
    parser = ToolCallParser("mistral", NAMES, new_id=_ids())
    first = parser.feed("[TOOL_CALLS]add[ARGS]")
    assert [(d.id, d.name) for d in first.calls] == [("id0000000", "add")]
    assert [d.arguments for d in parser.feed('{"a": ').calls] == ['{"a": ']
    assert [d.arguments for d in parser.feed("1}").calls] == ["1}"]


@pytest.mark.parametrize(
    "fmt,text,why",
    [
        ("mistral", '[TOOL_CALLS]nope[ARGS]{"a": 1}', "not one of the request's tools"),
        ("mistral", '[TOOL_CALLS]add[ARGS]{"a": 1', "not JSON"),
        ("mistral", "[TOOL_CALLS]add[ARGS][1, 2]", "not a JSON object"),
        ("mistral", "[TOOL_CALLS]add", "ended inside a tool call"),
        ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}', "ended inside a tool call"),
        ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>', "not JSON"),
        ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1}}', "ended inside a tool call"),
        ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '"name" string'),
        ("json", '[{"name": "add", "arguments": {"a": 1}}] and more', "text after"),
    ],
)
def test_malformed_calls_give_back_the_raw_text(fmt, text, why):
    for pieces in ([text], list(text)):
        content, _, parser = run(fmt, pieces)
        assert parser.error is not None and why in parser.error
        assert content == text.strip() or content == text
        assert final_reason("stop", parser) == MALFORMED_REASON


def test_plain_answers_pass_through():
    for fmt, text in [("mistral", "No [TOOL here, just text ["), ("hermes", "a <tool b <"), ("json", " hello [1]")]:
        for pieces in splits(text):
            content, calls, parser = run(fmt, pieces)
            assert (content, calls, parser.error) == (text, [], None)
            assert final_reason("stop", parser) == "stop"


def test_a_forced_call_that_is_not_a_call_is_malformed():
    for text in ("The weather is fine.", "", "  "):
        parser = ToolCallParser("json", NAMES, forced=True)
        out = parser.feed(text)
        rest = parser.finish()
        assert out.text + rest.text == text and not out.calls + rest.calls
        assert parser.error is not None and "must call" in parser.error
        assert final_reason("stop", parser) == MALFORMED_REASON
    _, calls, parser = run("json", ['[{"name": "add", "arguments": {}}]'])
    assert parser.error is None and merged(calls)[0]["name"] == "add"


def test_reasons():
    _, _, parser = run("hermes", [CASES["hermes"][1]])
    assert final_reason("stop", parser) == "tool_calls"
    assert final_reason("length", parser) == "length" and final_reason("abort", parser) == "abort"
    assert final_reason("stop", None) == "stop"


TOOLS = (
    ToolSpec(
        "get_weather", "Weather", '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}'
    ),
    ToolSpec("add", "Sum", "{}"),
)


def test_forced_schema_accepts_exactly_valid_calls():
    required = json.loads(forced_call_schema(TOOLS, "required"))
    jsonschema.Draft202012Validator.check_schema(required)
    ok = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1}}]
    jsonschema.validate(ok, required)
    for bad in (
        [],
        [{"name": "get_weather", "arguments": {}}],
        [{"name": "nope", "arguments": {}}],
        [{"name": "add", "arguments": 3}],
        [{"name": "add", "arguments": {}, "extra": 1}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    named = json.loads(forced_call_schema(TOOLS, "add"))
    jsonschema.validate([{"name": "add", "arguments": {}}], named)
    for bad in (ok, [{"name": "get_weather", "arguments": {"city": "x"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, named)


def test_forced_schema_output_parses_as_json_format():
    text = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    jsonschema.validate(json.loads(text), json.loads(forced_call_schema(TOOLS, "required")))
    for pieces in splits(text):
        _, calls, parser = run("json", pieces)
        assert parser.error is None and merged(calls)[0]["name"] == "get_weather"


def test_forced_schema_refuses_bad_input():
    with pytest.raises(ValueError, match="^tool_choice: "):
        forced_call_schema(TOOLS, "other")
    with pytest.raises(ValueError, match="^tools.parameters: "):
        forced_call_schema((ToolSpec("f", "", "{nope"),), "required")
