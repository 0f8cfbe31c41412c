"""Structured outputs in the native engine: every output parses and validates against its schema.

The model is a tiny random Mistral 4 with the v3 SentencePiece tokenizer (as in
test_resume.py): a random model writes whatever the mask leaves it, so a valid
output is the grammar's doing, not the model's. Schemas bound their strings,
numbers and arrays so that a random walk through them ends within max_tokens.
The embedded model's case is in test_structured_embedded.py.
"""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import numpy as np
import pytest
import torch

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, ReasoningConfig
from engine.core.request import SamplingParams, StructuredOutput
from engine.native.builder import build_engine_core
from engine.native.engine_core import EngineCore
from engine.native.sampler import Sampler, SampleRow
from engine.structured import bitmask_words
from engine.types import EngineError, Resume
from tests.engine.test_resume import assert_continues, client_after, drive, text, tokens

TOKENIZER = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"
CHAT = [{"role": "user", "content": "Report the wind as JSON"}]
# about 60 tokens: whole blocks for the prefix cache
LONG_CHAT = [{"role": "user", "content": "Report the wind at Tarifa, Cadiz and Almeria this afternoon as JSON, " * 3}]
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "station": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "active": {"type": "boolean"}},
                "required": ["id", "active"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "station"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"wind": {"enum": ["levante", "poniente", "tramontana"]}},
        "required": ["wind"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "readings": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 50},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["readings"],
        "additionalProperties": False,
    },
    "required": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"type": "string", "maxLength": 3}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}
GREEDY = dict(temperature=0.0)
SEEDED = dict(temperature=1.0, top_p=0.9, seed=1234)


def constrained(name: str, max_tokens: int = 96, **sampling) -> SamplingParams:
    spec = StructuredOutput("json_schema", json.dumps(SCHEMAS[name]), name=name)
    return SamplingParams(max_tokens=max_tokens, structured=spec, **(sampling or GREEDY))


def tiny_config(path: str, **cache) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=path, tokenizer=TOKENIZER, max_model_len=192),
        cache=CacheConfig(**{"block_size": 8, "num_blocks": 96, "enable_prefix_caching": False, **cache}),
        reasoning=ReasoningConfig(budget_low=4),
    )


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny("mistral4", seed=0, out=str(tmp_path_factory.mktemp("mistral4")), vocab_size=32768)


@pytest.fixture(scope="module")
def core(model_path) -> EngineCore:
    return build_engine_core(tiny_config(model_path))


def validated(deltas, name: str) -> dict:
    assert deltas[-1].finish_reason == "stop", text(deltas)
    out = json.loads(text(deltas))
    jsonschema.validate(out, SCHEMAS[name])
    return out


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED, dict(temperature=1.3, seed=7)], ids=["greedy", "seeded", "hot"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_output_parses_and_validates(core, name, sampling):
    deltas = drive(core, f"{name}", CHAT, constrained(name, **sampling))
    validated(deltas, name)
    assert deltas[-1].stop_reason is None  # the grammar ended it, not a stop string or token


def test_json_object_is_an_object(core):
    params = SamplingParams(temperature=0, max_tokens=160, structured=StructuredOutput("json_object"))
    deltas = drive(core, "object", CHAT, params)
    out = text(deltas)
    if deltas[-1].finish_reason == "length":  # a random model may write one long string: still JSON so far
        assert out.startswith("{")
    else:
        assert isinstance(json.loads(out), dict)


def test_without_a_constraint_the_model_writes_no_json(core):
    # the control for the tests above: the same model, unconstrained, is not accidentally valid
    deltas = drive(core, "free", CHAT, SamplingParams(temperature=0, max_tokens=24))
    with pytest.raises(ValueError):
        json.loads(text(deltas))


def test_a_token_the_grammar_refuses_aborts_instead_of_passing_as_stop(core, monkeypatch):
    """Were a mask ever missing, the output would not be valid JSON: the request ends "abort", never "stop"."""
    core.add_request("unmasked", CHAT, constrained("enum"))
    grammar = core.states["unmasked"].constraint.grammar
    monkeypatch.setattr(grammar, "fill_bitmask", lambda out: out.fill(-1))  # a mask that allows every token
    deltas = []
    while core.has_unfinished_requests():
        deltas += core.step()
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert not text(deltas).startswith('{"wind"')


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_unconstrained_rows_are_unchanged_by_a_constrained_neighbour(core, sampling):
    free = SamplingParams(max_tokens=24, logprobs=2, **sampling)
    alone = drive(core, "alone", CHAT, free)
    core.add_request("free", CHAT, free)
    core.add_request("json", CHAT, constrained("nested", **sampling))
    deltas = {"free": [], "json": []}
    shared = 0
    while core.has_unfinished_requests():
        step = core.step()
        shared += {d.request_id for d in step if d.token_ids} == {"free", "json"}
        for d in step:
            deltas[d.request_id].append(d)
    assert shared > 3  # they really decoded in the same batches
    assert tokens(deltas["free"]) == tokens(alone) and text(deltas["free"]) == text(alone)
    # logprobs come from the raw logits: a batch of two rounds its matmuls differently from a batch of one
    got = [lp.logprob for d in deltas["free"] for lp in d.logprobs or []]
    assert got == pytest.approx([lp.logprob for d in alone for lp in d.logprobs or []], abs=1e-4)
    validated(deltas["json"], "nested")


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_the_sampler_masks_only_the_constrained_rows(sampling):
    """On the very same logits, an unconstrained row draws what it draws without a masked neighbour."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=gen)
    params = SamplingParams(**sampling)
    allowed = np.zeros(bitmask_words(100), dtype=np.int32)
    allowed[2] = 1 << 3  # only token 67
    free = [SampleRow(params, 0), SampleRow(params, 0), SampleRow(params, 0)]
    mixed = [free[0], SampleRow(params, 0, allowed=allowed), free[2]]
    before = logits.clone()
    plain, masked = Sampler(seed=1)(logits, free), Sampler(seed=1)(logits, mixed)
    assert masked[1] == 67 and [masked[0], masked[2]] == [plain[0], plain[2]]
    assert torch.equal(logits, before)  # the step's logits stay raw, for logprobs


def test_the_constraint_applies_after_the_thinking_span(core):
    params = SamplingParams(
        temperature=1.0, seed=5, max_tokens=96, reasoning_effort="low", structured=constrained("enum").structured
    )
    deltas = drive(core, "think", CHAT, params)
    reasoning = "".join(d.reasoning_text for d in deltas)
    assert reasoning and deltas[-1].usage.reasoning_tokens == 4
    with pytest.raises(ValueError):  # the thinking span was not constrained: a random model writes no JSON
        json.loads(reasoning)
    validated(deltas, "enum")


def test_one_token_thinking_markers_hand_over_to_the_constraint(model_path):
    """Mistral's [THINK]/[/THINK] are one token each: the answer's grammar starts after the end marker,
    not at the start marker the engine forces."""
    config = dataclasses.replace(
        tiny_config(model_path), reasoning=ReasoningConfig(think_start_ids=(1000,), think_end_ids=(1001,), budget_low=4)
    )
    one_token = build_engine_core(config)
    params = SamplingParams(
        temperature=1.0, seed=5, max_tokens=96, reasoning_effort="low", structured=constrained("enum").structured
    )
    full = drive(one_token, "think", CHAT, params)
    assert tokens(full)[0] == 1000 and tokens(full)[5] == 1001  # forced start, 4 thinking tokens, forced end
    validated(full, "enum")
    for k in (1, 5, 6):  # resumed inside the span, at the end marker, and in the answer
        assert_continues(full, k, drive(one_token, f"think-{k}", CHAT, params, client_after(full, k)[0]))


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_resume_rebuilds_the_grammar_state(core, sampling):
    params = constrained("nested", **sampling)
    full = drive(core, "full", CHAT, params)
    validated(full, "nested")
    n = len(tokens(full))
    for k in (1, n // 2, n - 1):
        rest = drive(core, f"resumed-{k}", CHAT, params, client_after(full, k)[0])
        assert_continues(full, k, rest)


def test_resume_with_tokens_the_grammar_refuses(core):
    params = constrained("enum")
    full = drive(core, "full", CHAT, params)
    with pytest.raises(EngineError) as err:  # the output is already complete
        core.add_request("done", CHAT, params, Resume(tokens(full)))
    assert err.value.field == "resume.token_ids" and "already finished" in err.value.message
    free = tokens(drive(core, "free", CHAT, SamplingParams(temperature=0, max_tokens=4)))
    with pytest.raises(EngineError) as err:  # tokens an unconstrained run wrote: not JSON
        core.add_request("bad", CHAT, params, Resume(free))
    assert err.value.field == "resume.token_ids" and "response_format" in err.value.message
    assert not core.has_unfinished_requests()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (StructuredOutput("json_schema", '{"type": "strnig"}'), "response_format.json_schema"),
        (StructuredOutput("json_schema", "{not json"), "response_format.json_schema"),
    ],
)
def test_a_refused_schema_is_a_named_error_and_the_engine_stays_up(core, spec, field):
    with pytest.raises(EngineError) as err:
        core.add_request("refused", CHAT, SamplingParams(structured=spec))
    assert err.value.field == field and err.value.kind == "invalid_argument"
    validated(drive(core, "after", CHAT, constrained("enum")), "enum")


def test_preemption_by_recompute_keeps_the_grammar_state(model_path):
    # 7 usable blocks of 8 tokens hold three 8-token prompts, not the three ~25-token sequences they grow to
    small = build_engine_core(tiny_config(model_path, num_blocks=8))
    names = ["nested", "array", "required"]
    for name in names:
        small.add_request(name, CHAT, constrained(name, **SEEDED))
    deltas = {name: [] for name in names}
    while small.has_unfinished_requests():
        for d in small.step():
            deltas[d.request_id].append(d)
    assert small.stats().num_preemptions > 0
    roomy = build_engine_core(tiny_config(model_path))
    for name in names:
        validated(deltas[name], name)
        assert tokens(deltas[name]) == tokens(drive(roomy, name, CHAT, constrained(name, **SEEDED)))


def test_prefix_cache_hits_keep_outputs_valid(model_path):
    cached = build_engine_core(tiny_config(model_path, enable_prefix_caching=True))
    first = drive(cached, "first", LONG_CHAT, constrained("array", **SEEDED))
    again = drive(cached, "again", LONG_CHAT, constrained("array", **SEEDED))
    assert again[-1].usage.cached_tokens > 0
    assert tokens(again) == tokens(first)
    validated(again, "array")
