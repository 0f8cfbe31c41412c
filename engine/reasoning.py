"""Reasoning depth: thinking spans, their budget, and the split of output tokens.

Effort ``none`` keeps the model out of thinking mode (a one-token start
marker is banned; a span the model opens anyway is closed at once).
``low``/``medium``/``high`` open a span and give it a budget in tokens; when
the budget is spent the engine closes the span itself by emitting the end
marker. Every output token is released on exactly one channel: ``reasoning``
(inside a span), ``answer``, or ``marker`` (the markers themselves). Tokens
that could still be the start of a marker are held back until it is clear.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.config import EFFORTS, ReasoningConfig
from engine.core.stop import is_end_of_text
from engine.tokenizer import Tokenizer

REASONING, ANSWER, MARKER = "reasoning", "answer", "marker"


@dataclass(frozen=True)
class ThinkMarkers:
    start: tuple[int, ...]
    end: tuple[int, ...]


def resolve_markers(tokenizer: Tokenizer | None, cfg: ReasoningConfig) -> ThinkMarkers:
    """Token ids of the configured markers; Mistral's special tokens when the tokenizer has them."""
    if cfg.think_start_ids is not None and cfg.think_end_ids is not None:
        return ThinkMarkers(tuple(cfg.think_start_ids), tuple(cfg.think_end_ids))
    if tokenizer is None:
        return ThinkMarkers((), ())  # no tokenizer and no ids: thinking spans cannot be recognised
    if cfg.think_start is not None:
        start, end = cfg.think_start, cfg.think_end
    elif tokenizer.special_token_id("[THINK]") is not None and tokenizer.special_token_id("[/THINK]") is not None:
        start, end = "[THINK]", "[/THINK]"
    else:
        start, end = "<think>", "</think>"
    return ThinkMarkers(tuple(tokenizer.marker_ids(start)), tuple(tokenizer.marker_ids(end or "")))


def check_effort(effort: str) -> str:
    if effort not in EFFORTS:
        raise ValueError(f"reasoning_effort: must be one of {EFFORTS}, got {effort!r}")
    return effort


class ReasoningState:
    """Per-request thinking state; ``feed`` sees every output token in order."""

    def __init__(
        self,
        markers: ThinkMarkers,
        effort: str,
        budget: int,
        prompt_ids: list[int],
        eos_ids: frozenset[int] = frozenset(),
    ):
        self.markers = markers
        self.eos_ids = eos_ids
        self.effort = check_effort(effort)
        self.budget = budget if effort != "none" else 0
        self.num_reasoning_tokens = 0
        self.in_think = bool(markers.start) and tuple(prompt_ids[-len(markers.start) :]) == markers.start
        self._pending: deque[int] = deque()  # tokens the engine emits instead of sampling
        self._held: list[int] = []
        if effort != "none" and not self.in_think and markers.start:
            self._force(markers.start)

    def banned_token_ids(self) -> tuple[int, ...]:
        if self.effort == "none" and len(self.markers.start) == 1 and not self.in_think:
            return self.markers.start
        return ()

    @property
    def answering(self) -> bool:
        """The next token is answer text: no span open, no marker being forced or possibly begun."""
        return not self.in_think and not self._pending and not self._held

    def answer_only(self) -> None:
        """From here on every token is answer text: a constrained answer (``engine.structured``) may hold
        a start marker's text inside a JSON string, and that must not open a span."""
        self.markers = ThinkMarkers((), self.markers.end)

    def next_forced(self) -> int | None:
        """The token emitted next whatever is sampled (a marker the engine forces), if any."""
        return self._pending[0] if self._pending else None

    def next_token(self, sampled: int) -> int:
        """The token to emit this step: a forced marker token, or what was sampled.

        An end-of-text inside a thinking span closes the span instead, so a
        request that thinks always gets to its answer.
        """
        if not self._pending and self.in_think and is_end_of_text(sampled, self.eos_ids) and self.markers.end:
            self._force(self.markers.end)
        return self._pending.popleft() if self._pending else sampled

    def feed(self, token: int) -> list[tuple[int, str]]:
        """Classify an emitted token; returns the tokens released by it, each with its channel."""
        released: list[tuple[int, str]] = []
        self._held.append(token)
        while self._held:
            marker = self.markers.end if self.in_think else self.markers.start
            held = tuple(self._held)
            if marker and held == marker:
                released += [(t, MARKER) for t in held]
                self._held.clear()
                self.in_think = not self.in_think
            elif marker and marker[: len(held)] == held:
                break  # could still become the marker
            else:
                released.append((self._held.pop(0), self._channel()))
        self.num_reasoning_tokens += sum(1 for _, ch in released if ch == REASONING)
        if self.in_think and not self._pending and self.num_reasoning_tokens >= self.budget:
            self._force(self.markers.end)
        return released

    def flush(self) -> list[tuple[int, str]]:
        """Release what is held back when the request ends."""
        out = [(t, self._channel()) for t in self._held]
        self.num_reasoning_tokens += sum(1 for _, ch in out if ch == REASONING)
        self._held.clear()
        return out

    def _channel(self) -> str:
        return REASONING if self.in_think else ANSWER

    def _force(self, tokens: tuple[int, ...]) -> None:
        self._pending.extend(tokens)
