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
every step. With ``STRUCTURED_KEY`` too (response_format), the answer is
constrained by ``engine.structured``'s grammar as in the native engine: the
same ``AnswerConstraint`` rules, the same bitmask op on the constrained rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from engine.core.request import StructuredOutput
from engine.reasoning import ReasoningState, ThinkMarkers
from engine.structured import GrammarCompiler, grammar_compiler
from engine.structured.answer import AnswerConstraint
from engine.tokenizer import model_tokenizer
from kernels.bitmask import apply_token_bitmask_

REASONING_KEY = "levante_reasoning"
STRUCTURED_KEY = "levante_structured"


@dataclass
class _Row:
    state: ReasoningState
    tokens: list[int]  # vLLM's live list of this row's tokens (resumed outputs first)
    seen: int  # tokens of ``tokens`` already fed to ``state``
    temperature: float
    constraint: AnswerConstraint | None = None


def structured_args(
    spec: StructuredOutput, tokenizer: str | None, model_dir: str, vocab_size: int, eos_ids: list[int]
) -> dict:
    """What one request's ``extra_args[STRUCTURED_KEY]`` carries: the constraint, and how to load the tokenizer
    its grammar reads in vLLM's process (plain data: it crosses processes)."""
    return {
        "kind": spec.kind,
        "schema": spec.schema,
        "name": spec.name,
        "strict": spec.strict,
        "tokenizer": tokenizer,
        "model_dir": model_dir,
        "vocab_size": vocab_size,
        "eos": list(eos_ids),
    }


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


def _row(args: dict, prompt: list[int], outputs: list[int], temperature: float, compilers: _Compilers) -> _Row:
    n = args["prompt_len"]
    markers = ThinkMarkers(tuple(args["start"]), tuple(args["end"]))
    state = ReasoningState(markers, args["effort"], args["budget"], prompt[:n], frozenset(args["eos"]))
    row = _Row(state, outputs, 0, temperature, compilers.constraint(args.get(STRUCTURED_KEY), state))
    for t in prompt[n:]:  # a resumed request: its earlier outputs arrive as prompt tail
        _emitted(row, t)
    return row


def _emitted(row: _Row, token: int) -> None:
    """``token`` was emitted: pop the forced token it may be, then classify it, as the native engine does."""
    if row.constraint is not None:
        row.constraint.start()  # as asked before this token was sampled: nothing changed since
    row.state.next_token(token)
    if row.constraint is not None:
        row.constraint.accept(token)
    row.state.feed(token)


class _Compilers:
    """The grammar compilers of this vLLM process, one per tokenizer, each built on first use."""

    def __init__(self) -> None:
        self._made: dict[tuple, GrammarCompiler] = {}

    def constraint(self, args: dict | None, state: ReasoningState) -> AnswerConstraint | None:
        if args is None:
            return None
        key = (args["tokenizer"], args["model_dir"], args["vocab_size"], tuple(args["eos"]))
        if key not in self._made:
            tokenizer = model_tokenizer(args["tokenizer"], args["model_dir"], args["vocab_size"])
            assert tokenizer is not None, "Levante admitted a response_format for a model without a tokenizer"
            self._made[key] = grammar_compiler(tokenizer, args["vocab_size"], args["eos"])
        spec = StructuredOutput(args["kind"], args["schema"], args["name"], args["strict"])
        return AnswerConstraint(self._made[key].matcher(spec), state)


class ReasoningLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        del vllm_config, device, is_pin_memory
        self.rows: dict[int, _Row] = {}
        self.compilers = _Compilers()

    def is_argmax_invariant(self) -> bool:
        return False  # it forces and bans tokens

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self._apply_batch_update(batch_update)
        for row in self.rows.values():
            while row.seen < len(row.tokens):
                _emitted(row, row.tokens[row.seen])
                row.seen += 1

    def _apply_batch_update(self, update: BatchUpdate) -> None:
        for index in update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, outputs in update.added:
            extra = (params.extra_args or {}) if params is not None else {}
            args = extra.get(REASONING_KEY)
            if args is None:
                self.rows.pop(index, None)
            else:
                args = {**args, STRUCTURED_KEY: extra.get(STRUCTURED_KEY)}
                self.rows[index] = _row(args, list(prompt or []), outputs, params.temperature, self.compilers)
        for a, b, direction in update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction.name == "SWAP":
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [batch, vocab], one row per running request
        constrained, masks = [], []
        for index, row in self.rows.items():
            self._apply_row(logits[index], row)
            mask = row.constraint.bitmask(logits.shape[1]) if row.constraint is not None else None
            if mask is not None:  # None while a thinking span or a forced marker runs
                constrained.append(index)
                masks.append(mask)
        if constrained:  # the constrained rows only: the others keep their logits bit for bit
            bitmask = torch.from_numpy(np.stack(masks))  # [R, ceil(vocab / 32)] int32
            apply_token_bitmask_(logits, bitmask, torch.tensor(constrained, dtype=torch.int64))
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
