"""The one way to get a grammar compiler."""

from __future__ import annotations

from collections.abc import Sequence

from engine.structured.base import GrammarCompiler
from engine.tokenizer import Tokenizer


def grammar_compiler(tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> GrammarCompiler:
    """A compiler for ``tokenizer``'s vocabulary, masks ``vocab_size`` wide (the model's logits, which may
    exceed the tokenizer's: the extra ids are never allowed); ``eos_ids`` end the output where the grammar
    allows it. Reads the whole vocabulary once (0.5-1.5 s for 131072 tokens, docs/benchmarks.md)."""
    from engine.structured.guidance import GuidanceCompiler  # the grammar engine loads only when used

    return GuidanceCompiler(tokenizer, vocab_size, tuple(eos_ids))
