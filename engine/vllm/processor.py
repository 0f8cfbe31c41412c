"""Thinking spans inside vLLM's sampler, by the native engine's rules.

The native engine picks a token, then lets ``ReasoningState.next_token``
replace it (a forced marker, or the end marker instead of an end-of-text
inside a span). vLLM samples in its own process, so this processor does the
same before sampling: a forced token is the only one left; a banned one is
removed; inside a span, the end-of-text probability moves onto the end
marker. Greedy decoding then picks exactly what the native engine emits, and
sampling draws from the same distribution (before top-k/top-p).

A request takes part when its ``SamplingParams.extra_args`` holds
``REASONING_KEY`` (markers, effort, budget, end-of-text ids, prompt length);
the output tokens that vLLM appends to each row are fed to its state before
every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from engine.reasoning import ReasoningState, ThinkMarkers

REASONING_KEY = "levante_reasoning"


@dataclass
class _Row:
    state: ReasoningState
    tokens: list[int]  # vLLM's live list of this row's tokens (resumed outputs first)
    seen: int  # tokens of ``tokens`` already fed to ``state``
    temperature: float


def reasoning_args(markers: ThinkMarkers, effort: str, budget: int, eos_ids: list[int], prompt_len: int) -> dict:
    """What one request's ``extra_args[REASONING_KEY]`` carries (plain data: it crosses processes)."""
    return {
        "start": list(markers.start),
        "end": list(markers.end),
        "effort": effort,
        "budget": budget,
        "eos": list(eos_ids),
        "prompt_len": prompt_len,
    }


def _row(args: dict, prompt: list[int], outputs: list[int], temperature: float) -> _Row:
    n = args["prompt_len"]
    markers = ThinkMarkers(tuple(args["start"]), tuple(args["end"]))
    state = ReasoningState(markers, args["effort"], args["budget"], prompt[:n], frozenset(args["eos"]))
    for t in prompt[n:]:  # a resumed request: its earlier outputs arrive as prompt tail
        _emitted(state, t)
    return _Row(state, outputs, 0, temperature)


def _emitted(state: ReasoningState, token: int) -> None:
    """``token`` was emitted: pop the forced token it may be, then classify it, as the native engine does."""
    state.next_token(token)
    state.feed(token)


class ReasoningLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        del vllm_config, device, is_pin_memory
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it forces and bans tokens

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self._apply_batch_update(batch_update)
        for row in self.rows.values():
            while row.seen < len(row.tokens):
                _emitted(row.state, row.tokens[row.seen])
                row.seen += 1

    def _apply_batch_update(self, update: BatchUpdate) -> None:
        for index in update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, outputs in update.added:
            args = (params.extra_args or {}).get(REASONING_KEY) if params is not None else None
            if args is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _row(args, list(prompt or []), outputs, params.temperature)
        for a, b, direction in update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction.name == "SWAP":
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [batch, vocab], one row per running request
        for index, row in self.rows.items():
            self._apply_row(logits[index], row)
        return logits

    def _apply_row(self, logits: torch.Tensor, row: _Row) -> None:
        # logits: [vocab], edited in place
        state = row.state
        forced = state.next_forced()
        if forced is not None:
            keep = logits[forced].clone()
            logits.fill_(float("-inf"))
            logits[forced] = keep
            return
        banned = list(state.banned_token_ids())
        if banned:
            logits[banned] = float("-inf")
        end = state.markers.end
        if state.in_think and end and state.eos_ids:
            # the native engine emits the end marker where an end-of-text was picked: same mass, same place
            eos = torch.tensor(sorted(state.eos_ids), device=logits.device)
            t = row.temperature if row.temperature > 0 else 1.0
            merged = torch.cat([logits[end[0]].reshape(1), logits[eos]]) / t
            logits[end[0]] = torch.logsumexp(merged, dim=0) * t
            logits[eos] = float("-inf")
