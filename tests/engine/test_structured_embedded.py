"""Structured outputs on the embedded model (SmolLM2-135M-Instruct): a real model, its byte-level vocabulary."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine.core.request import SamplingParams, StructuredOutput
from engine.llm import LLM
from tests.engine.test_structured import SCHEMAS

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "Describe the wind at a weather station in Tarifa as JSON."}]


@pytest.fixture(scope="module")
def llm():
    return LLM()


@pytest.mark.parametrize(
    ("name", "sampling"),
    [
        ("nested", dict(temperature=0)),
        ("array", dict(temperature=0.8, seed=3)),
        ("enum", dict(temperature=1.0, seed=9)),
    ],
)
def test_schema_output_validates(llm, name, sampling):
    spec = StructuredOutput("json_schema", json.dumps(SCHEMAS[name]), name=name)
    out = llm.chat(ASK, SamplingParams(max_tokens=96, structured=spec, **sampling))[0]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), SCHEMAS[name])


def test_json_object_is_an_object_and_streams_the_same(llm):
    params = SamplingParams(temperature=0, max_tokens=128, structured=StructuredOutput("json_object"))
    out = llm.chat(ASK, params)[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)
    assert "".join(d.text for d in llm.stream(ASK, params)) == out.text
