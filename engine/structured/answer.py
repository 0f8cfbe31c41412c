"""A grammar over the answer part of one request's output: the same rules wherever the mask is applied
(the native engine's request state, and Levante's logits processor inside vLLM)."""

from __future__ import annotations

import numpy as np

from engine.reasoning import ReasoningState
from engine.structured.base import GrammarMatcher, bitmask_words


class AnswerConstraint:
    """Follows one request's emitted tokens; constrains them from the answer's first token on.

    ``start()`` is asked before each token is chosen (before the reasoning state's ``next_token`` pops
    a forced marker): the constraint begins once a thinking span and its markers are over, and holds
    from then on. ``accept`` sees every emitted token after that.
    """

    def __init__(self, grammar: GrammarMatcher, reasoning: ReasoningState):
        self.grammar = grammar
        self.reasoning = reasoning
        self.on = False  # the answer has begun: every token since went through the grammar
        self.refused: int | None = None  # a token the grammar did not allow (a bug, or a bad resume)

    def start(self) -> bool:
        """Whether the next token must be one the grammar allows."""
        if not self.on and self.reasoning.answering:
            self.on = True
            self.reasoning.answer_only()
        return self.on

    def accept(self, token: int) -> None:
        if self.on and self.refused is None and not self.grammar.accept(token):
            self.refused = token

    @property
    def done(self) -> bool:
        """The constrained answer is complete (or went wrong): nothing more may follow."""
        return self.grammar.is_terminated or self.refused is not None

    def bitmask(self, vocab_size: int) -> np.ndarray | None:
        """The tokens allowed next, [bitmask_words(vocab_size)] int32, or None while unconstrained."""
        if not self.start():
            return None
        mask = np.zeros(bitmask_words(vocab_size), dtype=np.int32)
        self.grammar.fill_bitmask(mask)
        return mask
