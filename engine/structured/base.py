"""The grammar layer's contract: a compiler per tokenizer, a matcher per request."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from engine.core.request import StructuredOutput


def bitmask_words(vocab_size: int) -> int:
    """int32 words in one row of a next-token bitmask: bit ``t % 32`` of word ``t // 32`` allows token t."""
    return (vocab_size + 31) // 32


class GrammarMatcher(ABC):
    """One request's position in its grammar; sees every token the request emits under the constraint."""

    @abstractmethod
    def accept(self, token_id: int) -> bool:
        """Advance by one emitted token; False (state unchanged) when the grammar does not allow it."""

    @abstractmethod
    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the tokens allowed next into ``out``: [bitmask_words(V)] int32."""

    @property
    @abstractmethod
    def is_terminated(self) -> bool:
        """The output is complete: the grammar allows nothing more (end-of-text aside)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` accepted tokens (tokens a caller takes back)."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the grammar's start, to rebuild the state from tokens replayed through ``accept``."""


class GrammarCompiler(ABC):
    """Turns a ``StructuredOutput`` into matchers for one tokenizer; compiles each schema once."""

    vocab_size: int  # the model's logits width; bitmasks have bitmask_words(vocab_size) words

    @abstractmethod
    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher at the grammar's start. Raises ``EngineError`` naming ``response_format`` or
        ``response_format.json_schema`` for a schema the grammar engine refuses."""
