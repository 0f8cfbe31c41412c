"""The grammar layer alone: vocabulary bytes, compile, matcher, refusals naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.core.request import StructuredOutput
from engine.structured import bitmask_words, grammar_compiler
from engine.structured.guidance import _Vocab
from engine.tokenizer import load_tokenizer, resolve_tokenizer_path
from engine.types import EngineError

SPM = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"  # 32768 tokens, byte fallback, "▁" spaces
MODEL_VOCAB = 32800  # wider than the tokenizer, as a model's logits may be
SCHEMA = {
    "type": "object",
    "properties": {"wind": {"enum": ["levante", "poniente"]}, "speed": {"type": "integer"}},
    "required": ["wind", "speed"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_tokenizer_path(SPM))


@pytest.fixture(scope="module")
def compiler(tok):
    return grammar_compiler(tok, MODEL_VOCAB, [tok.eos_token_id])


def allowed(matcher) -> list[int]:
    mask = np.zeros(bitmask_words(MODEL_VOCAB), dtype=np.int32)
    matcher.fill_bitmask(mask)
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:MODEL_VOCAB]).tolist()


def ids_of(tok, text: str) -> list[int]:
    return _Vocab(tok, MODEL_VOCAB, (tok.eos_token_id,))(text)


@pytest.mark.parametrize("path", [SPM, "mistral-common:tekken_240911.json"], ids=["sentencepiece", "tekken"])
def test_vocab_bytes_spell_what_the_tokenizer_decodes(path):
    tok = load_tokenizer(resolve_tokenizer_path(path))
    vocab = tok.vocab_bytes()
    text = 'Levante {"a": [1, 2.5]} über 日本 🦩'
    ids = tok.encode(text, add_special_tokens=False)
    assert len(vocab.tokens) == tok.vocab_size and tok.eos_token_id in vocab.special_ids
    assert b"".join(vocab.tokens[i] for i in ids).decode().strip() == text  # SentencePiece adds one leading space


def test_a_valid_instance_is_accepted_and_ends_the_grammar(tok, compiler):
    m = compiler.matcher(StructuredOutput("json_schema", json.dumps(SCHEMA)))
    ids = ids_of(tok, '{"wind": "levante", "speed": 12}')
    for t in ids:
        assert t in allowed(m) and m.accept(t)
    assert m.is_terminated and allowed(m) == [tok.eos_token_id]


def test_a_token_outside_the_grammar_is_refused_and_changes_nothing(tok, compiler):
    m = compiler.matcher(StructuredOutput("json_schema", json.dumps(SCHEMA)))
    before = allowed(m)
    assert all(t < tok.vocab_size for t in before)  # ids past the tokenizer's vocabulary are never allowed
    bad = ids_of(tok, "[")[0]
    assert bad not in before and not m.accept(bad) and allowed(m) == before
    assert not m.accept(tok.eos_token_id)  # nothing is complete yet: end-of-text is not allowed


def test_rollback_and_reset_rebuild_the_state(tok, compiler):
    m = compiler.matcher(StructuredOutput("json_object"))
    ids = ids_of(tok, '{"a": 1}')
    start = allowed(m)
    for t in ids[:3]:
        assert m.accept(t)
    after_three = allowed(m)
    assert m.accept(ids[3])
    m.rollback(1)
    assert allowed(m) == after_three
    m.reset()
    assert allowed(m) == start


def test_matchers_of_one_schema_are_independent(tok, compiler):
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    a, b = compiler.matcher(spec), compiler.matcher(spec)  # the second from the compile cache
    assert a.accept(ids_of(tok, '{"')[0])
    assert allowed(b) != allowed(a)


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ('{"type": "strnig"}', "strnig"),
        ('{"$ref": "#/nowhere"}', "nowhere"),
        ("not json", "not a usable JSON Schema"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_a_refused_schema_names_the_field(compiler, schema, needle):
    with pytest.raises(EngineError) as err:
        compiler.matcher(StructuredOutput("json_schema", schema))
    assert err.value.field == "response_format.json_schema" and needle in err.value.message


def test_strict_refuses_what_the_engine_cannot_enforce_and_non_strict_ignores_it(compiler):
    schema = '{"type": "string", "format": "not-a-format"}'
    with pytest.raises(EngineError, match="not-a-format"):
        compiler.matcher(StructuredOutput("json_schema", schema, strict=True))
    compiler.matcher(StructuredOutput("json_schema", schema, strict=False))


def test_a_schema_cannot_loosen_the_server_layout(tok, compiler):
    loose = dict(SCHEMA, **{"x-guidance": {"whitespace_flexible": True}})
    m = compiler.matcher(StructuredOutput("json_schema", json.dumps(loose)))
    for t in ids_of(tok, '{"wind": "levante", "speed": 1}'):
        assert m.accept(t)
    assert m.is_terminated  # no trailing whitespace run allowed after the object
