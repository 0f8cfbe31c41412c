"""Structured outputs: grammars that constrain decoding to JSON, or to JSON a schema accepts.

``grammar_compiler(tokenizer, ...)`` is the one factory: it turns a request's
``StructuredOutput`` into a per-request ``GrammarMatcher`` (compiled once per
schema and tokenizer, then copied), which fills each step's next-token bitmask
and follows the tokens the request emits. The grammar engine is llguidance
(chosen by measurement: docs/benchmarks.md). Torch-free: bitmasks are numpy;
the runner applies them to the logits (``kernels.bitmask``).
"""

from engine.structured.base import GrammarCompiler, GrammarMatcher, bitmask_words
from engine.structured.factory import grammar_compiler

__all__ = ["GrammarCompiler", "GrammarMatcher", "bitmask_words", "grammar_compiler"]
