"""The grammar layer on llguidance: JSON Schema to a token-level matcher, masks computed in Rust."""

from __future__ import annotations

import json
from collections import OrderedDict

import llguidance as llg
import numpy as np

from engine.core.request import StructuredOutput
from engine.structured.base import GrammarCompiler, GrammarMatcher, bitmask_words
from engine.tokenizer import Tokenizer
from engine.types import EngineError

# What the server decides, whatever a schema's own "x-guidance" says: JSON laid out as json.dumps does
# (no free whitespace runs, which small models can loop in) and, with strict false, keywords llguidance
# does not enforce are ignored instead of refused.
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 128  # compiled schemas kept per tokenizer


class _Vocab:
    """What llguidance's ``TokenizerWrapper`` reads: each token's bytes, the special ids, a tokenize call."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
        vocab = tokenizer.vocab_bytes()
        pad = range(len(vocab.tokens), vocab_size)  # ids the model has and the tokenizer lacks: never allowed
        self.tokens = vocab.tokens + [b"" for _ in pad]
        self.special_token_ids = sorted(vocab.special_ids | set(pad))
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer
        self._ids = {t: i for i, t in reversed(list(enumerate(vocab.tokens))) if i not in vocab.special_ids and t}
        self._longest = max(len(t) for t in self._ids)

    def __call__(self, text: str | bytes) -> list[int]:
        """Token ids whose bytes are exactly ``text``: the tokenizer's own when they are (SentencePiece adds
        a leading space), else the longest vocabulary pieces from left to right."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        ids = self._tokenizer.encode(data.decode("utf-8", "replace"), add_special_tokens=False)
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        out, i = [], 0
        while i < len(data):
            longest = min(self._longest, len(data) - i)
            n = next((n for n in range(longest, 0, -1) if data[i : i + n] in self._ids), 0)
            if n:
                out.append(self._ids[data[i : i + n]])
            i += n or 1  # a byte no token spells (a vocabulary without byte fallback): the grammar cannot need it
        return out


class GuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: llg.LLMatcher):
        self._m = matcher

    def accept(self, token_id: int) -> bool:
        # try_consume takes the token only if the grammar allows it; consume_token would enter an
        # error state for good on a refused one
        return self._m.try_consume_tokens([token_id]) == 1

    def fill_bitmask(self, out: np.ndarray) -> None:
        # out: [W] int32, C-contiguous; llguidance checks the size against its vocabulary
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    @property
    def is_terminated(self) -> bool:
        return self._m.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        if not self._m.rollback(num_tokens):
            raise ValueError(f"grammar: cannot roll back {num_tokens} tokens: {self._m.get_error()}")

    def reset(self) -> None:
        self._m.reset()


class GuidanceCompiler(GrammarCompiler):
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
        if not eos_ids:
            raise ValueError("response_format: this model has no end-of-text token to end a constrained output")
        self.vocab_size = vocab_size
        self._tokenizer = llg.LLTokenizer(
            llg.TokenizerWrapper(_Vocab(tokenizer, vocab_size, eos_ids)), n_vocab=vocab_size, eos_token=list(eos_ids)
        )
        assert bitmask_words(self._tokenizer.vocab_size) == bitmask_words(vocab_size), "llguidance resized the vocab"
        self._compiled: OrderedDict[tuple, llg.LLMatcher] = OrderedDict()

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        key = (spec.kind, spec.schema, spec.strict)
        template = self._compiled.get(key)
        if template is None:
            template = self._compile(spec)
            self._compiled[key] = template
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return GuidanceMatcher(template.deep_copy())

    def _compile(self, spec: StructuredOutput) -> llg.LLMatcher:
        field = "response_format.json_schema" if spec.kind == "json_schema" else "response_format"
        schema = spec.schema if spec.schema is not None else '{"type": "object"}'
        try:
            if not isinstance(json.loads(schema), (dict, bool)):
                raise ValueError("must be a JSON object")
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides={**_LAYOUT, "lenient": not spec.strict})
        except ValueError as e:  # json.JSONDecodeError included
            raise EngineError(field, f"not a usable JSON Schema: {str(e)[:200]}") from None
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise EngineError(field, f"the grammar engine refused it: {matcher.get_error()[:200]}")
        return matcher
