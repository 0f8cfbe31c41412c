"""response_format over gRPC: the proto field both ways, its cap, and a real front door over a real engine."""

from __future__ import annotations

import ast
import json
import pathlib
import re

import grpc
import jsonschema
import pytest

from cluster.config import FrontDoorConfig, InputLimitsConfig
from cluster.frontdoor.convert import Limits, RequestError, decode_generate, encode_generate
from engine.types import StructuredOutput
from levante.v1 import inference_pb2 as pb
from tests.engine.test_structured import SCHEMAS

from .harness import channel, engine_backend, generate, rpc_error, serving, tiny_engine

DOC = pathlib.Path(__file__).parents[3] / "docs" / "serving.md"
LIMITS = Limits("m", max_model_len=1000, max_request_bytes=1 << 20, inputs=InputLimitsConfig(max_schema_bytes=256))
ENUM = json.dumps(SCHEMAS["enum"])
NESTED = json.dumps(SCHEMAS["nested"])


def decode(**fields):
    return decode_generate(pb.GenerateRequest(prompt="hi", **fields).SerializeToString(), LIMITS)


# ---- the conversion, without a server --------------------------------------------------------------


def test_unset_is_unconstrained_and_each_type_arrives():
    assert decode().params.structured is None
    got = decode(response_format=pb.ResponseFormat(type="json_object")).params.structured
    assert got == StructuredOutput("json_object", strict=False)
    rf = pb.ResponseFormat(type="json_schema", json_schema=ENUM, name="wind", strict=True)
    assert decode(response_format=rf).params.structured == StructuredOutput("json_schema", ENUM, "wind", True)


def test_a_forwarded_request_keeps_its_response_format():
    """A region router forwards to a peer (failover, spill) with encode_generate: the constraint must survive."""
    rf = pb.ResponseFormat(type="json_schema", json_schema=ENUM, name="wind", strict=True)
    first = decode(response_format=rf)
    again = decode_generate(encode_generate(first), LIMITS)
    assert again.params.structured == first.params.structured
    assert decode_generate(encode_generate(decode()), LIMITS).params.structured is None


@pytest.mark.parametrize(
    ("rf", "field"),
    [
        (pb.ResponseFormat(type="yaml"), "response_format.type"),
        (pb.ResponseFormat(type=""), "response_format.type"),
        (pb.ResponseFormat(type="json_schema"), "response_format.json_schema"),  # no schema
        (pb.ResponseFormat(type="json_object", json_schema=ENUM), "response_format.json_schema"),
    ],
)
def test_a_malformed_response_format_names_the_field(rf, field):
    with pytest.raises(RequestError) as err:
        decode(response_format=rf)
    assert err.value.field == field


def test_the_schema_size_cap_names_the_field_and_the_key():
    at = '{"type": "object", "description": "' + "x" * 219 + '"}'
    assert len(at.encode()) == LIMITS.inputs.max_schema_bytes
    decode(response_format=pb.ResponseFormat(type="json_schema", json_schema=at))
    past = at.replace("xx", "xé")  # one more byte, same characters
    with pytest.raises(RequestError, match=r"^response_format\.json_schema: .*\(frontdoor\.limits\.max_schema_bytes\)"):
        decode(response_format=pb.ResponseFormat(type="json_schema", json_schema=past))


def test_openai_response_format_objects_map_onto_structured_output():
    spec = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMAS["enum"], "strict": True}}
    assert StructuredOutput.from_openai(spec) == StructuredOutput("json_schema", ENUM, "w", True)
    assert StructuredOutput.from_openai({"type": "json_object"}) == StructuredOutput("json_object", strict=False)
    assert StructuredOutput.from_openai({"type": "text"}) is None
    with pytest.raises(ValueError, match=r"^response_format\.json_schema: "):
        StructuredOutput.from_openai({"type": "json_schema"})


# ---- a real front door over a real engine ----------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_moe):
    with tiny_engine(tiny_moe, max_model_len=512) as eng:
        yield eng


@pytest.fixture(scope="module")
def door(engine, loop):
    with serving(loop, engine_backend(loop, engine), FrontDoorConfig(port=0)) as d:
        yield d


@pytest.fixture(scope="module")
def ch(door):
    with channel(door) as c:
        yield c


def answer(responses) -> tuple[str, pb.Final]:
    text = "".join(r.delta.text for r in responses if r.WhichOneof("kind") == "delta")
    return text, responses[-1].final


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["nested", "enum", "array"])
@pytest.mark.parametrize("seed", [None, 11], ids=["greedy", "seeded"])
def test_generate_returns_json_the_schema_accepts(ch, name, seed):
    req = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Report the wind as JSON")]),
        max_tokens=96,
        temperature=0 if seed is None else 1.0,
        response_format=pb.ResponseFormat(type="json_schema", json_schema=json.dumps(SCHEMAS[name]), strict=True),
    )
    if seed is not None:
        req.seed = seed
    text, final = answer(generate(ch, req))
    assert final.finish_reason == pb.FINISH_REASON_STOP, text
    jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("schema", "needle"), [('{"type": "strnig"}', "strnig"), ("{not json", "not a usable JSON Schema")]
)
def test_a_schema_the_grammar_engine_refuses_is_invalid_argument_naming_it(ch, schema, needle):
    req = pb.GenerateRequest(
        prompt="Hi", max_tokens=8, response_format=pb.ResponseFormat(type="json_schema", json_schema=schema)
    )
    err = rpc_error(lambda: generate(ch, req))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("response_format.json_schema: ") and needle in err.details()
    _, final = answer(generate(ch, pb.GenerateRequest(prompt="Hello", max_tokens=2, temperature=0)))
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)  # still serving


@pytest.mark.e2e
def test_an_oversized_schema_is_refused_at_the_door(ch):
    big = json.dumps({"type": "object", "description": "x" * InputLimitsConfig().max_schema_bytes})
    req = pb.GenerateRequest(prompt="Hi", response_format=pb.ResponseFormat(type="json_schema", json_schema=big))
    err = rpc_error(lambda: generate(ch, req))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("response_format.json_schema: ") and "max_schema_bytes" in err.details()


@pytest.mark.e2e
def test_the_documented_example_returns_valid_json(door, capsys):
    """docs/serving.md's RegionClient example, run as written: only its addresses change (to this door)."""
    section = DOC.read_text().split("## Structured outputs", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    assert "response_format" in code
    for address in ("10.0.0.1:50051", "10.1.0.1:50051"):
        assert address in code
        code = code.replace(address, f"127.0.0.1:{door.port}")
    example = {"__name__": "__main__"}
    exec(compile(code, str(DOC), "exec"), example)  # noqa: S102 -- the doc's example as written
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    jsonschema.validate(printed, example["WIND"])  # the example's own schema
