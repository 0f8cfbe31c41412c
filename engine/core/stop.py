"""When a request ends: every stop rule in one place, torch-free.

A request stops ("stop") on its end-of-text token unless ``ignore_eos``, or
on one of its ``stop_token_ids``; it stops ("length") at ``max_tokens``
outputs or ``max_model_len`` tokens in all (``check_token``); and its answer
stops at the first of its ``stop`` strings (``find_stop_string``). Inside a
thinking span an end-of-text closes the span instead (``is_end_of_text``,
asked by ``engine.reasoning``). The scheduler, the detokenizer, admission
(a resumed token that already ended the request) and the reasoning state ask
here, so the rules cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from engine.core.request import SamplingParams


@dataclass(frozen=True)
class Stop:
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or string; None for end-of-text and length


def stop_token(token: int, params: SamplingParams, eos_token_id: int | None) -> Stop | None:
    """Whether ``token`` ends the request as a stop token (end-of-text first, then ``stop_token_ids``)."""
    if token == eos_token_id and not params.ignore_eos:
        return Stop("stop")
    if token in params.stop_token_ids:
        return Stop("stop", token)
    return None


def check_token(
    token: int,
    params: SamplingParams,
    eos_token_id: int | None,
    num_output_tokens: int,
    num_tokens: int,
    max_model_len: int,
) -> Stop | None:
    """Whether the request ends with ``token``, its last output (counted in ``num_output_tokens``, ``num_tokens``)."""
    stop = stop_token(token, params, eos_token_id)
    if stop is None and (num_output_tokens >= params.max_tokens or num_tokens >= max_model_len):
        stop = Stop("length")
    return stop


def is_end_of_text(token: int, eos_ids: Collection[int]) -> bool:
    """Any of the model's end-of-text ids, whatever ``ignore_eos`` says (a thinking span closes on it)."""
    return token in eos_ids


def stop_string_hold(stops: Sequence[str]) -> int:
    """Characters of new text held back: the longest tail that could still grow into a stop string."""
    return max((len(s) for s in stops), default=1) - 1


def find_stop_string(text: str, stops: Sequence[str], sent: int, include: bool) -> tuple[int, str] | None:
    """The first of ``stops`` in ``text``: (where the text is cut, the stop string), or None.

    Each is looked for from ``sent - len(stop)`` on: text before that was
    searched when it came. The cut keeps the stop string when ``include``.
    """
    for stop in stops:
        at = text.find(stop, max(0, sent - len(stop)))
        if at >= 0:
            return (at + len(stop) if include else at), stop
    return None
