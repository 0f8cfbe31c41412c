"""Model runner: one scheduler step -> tensors -> logits -> sampled tokens.

Owns the model, its paged KV cache and the sampler. Flattens the step's
sequences into one varlen batch, runs the model once, and computes logits
only for the rows that need them (the last row of each sampling sequence,
and every row of a chunk whose prompt logprobs were asked for).

Under expert parallelism rank 0's runner hands each step's ``StepInputs`` to
a broadcaster before its forward; ranks 1.. run ``forward`` on the same
inputs, so the MoE all-reduces inside the model pair up one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

import torch

from engine.core.request import Request
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.native.models.base import CausalLM
from engine.native.sampler import Sampler, SampleRow, logprobs_of
from engine.types import TokenLogprob
from kernels.metadata import AttentionMetadata


@dataclass
class StepInputs:
    """Everything a model forward needs for one step: the flattened batch and its paging."""

    input_ids: list[int]  # [T] the step's tokens, sequence after sequence
    positions: list[int]  # [T]
    query_lens: list[int]  # [B] new tokens per sequence
    seq_lens: list[int]  # [B] context length including the new tokens
    block_ids: list[list[int]]  # [B][n_b] each sequence's block table; 0 (null) before a sliding window

    @staticmethod
    def of(seqs: Sequence[ScheduledSeq]) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        for s in seqs:
            input_ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + len(s.token_ids)))
        query_lens = [len(s.token_ids) for s in seqs]
        seq_lens = [s.start_pos + n for s, n in zip(seqs, query_lens)]
        return StepInputs(input_ids, positions, query_lens, seq_lens, [list(s.block_ids) for s in seqs])


class StepSink(Protocol):
    """Where rank 0 sends each step's inputs before its own forward (``engine.native.parallel``'s broadcaster)."""

    def send(self, inputs: StepInputs) -> None: ...


@dataclass
class StepResult:
    request_ids: list[str]  # the requests that sampled, in row order
    sampled: list[int]  # one token per sampling request
    logits: torch.Tensor  # [num_sampling, V] float32 on the engine's device, rows match request_ids
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self, model: CausalLM, num_blocks: int, block_size: int, seed: int = 0, step_sink: StepSink | None = None
    ):
        self.model = model
        self.step_sink = step_sink  # set on rank 0 of an expert-parallel group
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device  # the KV cache and every step tensor live with the weights
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.sampler = Sampler(seed, self.device)
        # For tests and debugging: called with (request_ids, logits [N, V]) every step.
        self.logits_hook: Callable[[list[str], torch.Tensor], None] | None = None

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, requests: Mapping[str, Request], rows: Mapping[str, SampleRow]
    ) -> StepResult:
        seqs = out.seqs
        inputs = StepInputs.of(seqs)
        if self.step_sink is not None:
            self.step_sink.send(inputs)  # the other ranks run this same forward alongside ours
        hidden, _meta = self.forward(inputs)  # [T, D]

        ends = list(accumulate(inputs.query_lens))  # host copy of meta.query_start_loc[1:]: no device sync
        sample_ids = [s.request_id for s in seqs if s.samples]
        sample_rows = [end - 1 for s, end in zip(seqs, ends) if s.samples]
        logits = self.model.compute_logits(hidden[sample_rows]) if sample_rows else hidden.new_zeros(0, 0)
        if self.logits_hook is not None and sample_ids:
            self.logits_hook(sample_ids, logits)
        sampled = self.sampler(logits, [rows[r] for r in sample_ids]) if sample_ids else []
        result = StepResult(sample_ids, sampled, logits)
        for s, end in zip(seqs, ends):
            if s.wants_prompt_logprobs:
                result.prompt_logprobs[s.request_id] = self._prompt_logprobs(s, end, hidden, requests[s.request_id])
        return result

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> tuple[torch.Tensor, AttentionMetadata]:
        """Run the model on one step's inputs, writing their KV entries: (final hidden [T, D], metadata)."""
        meta = AttentionMetadata.build(
            self.block_size, inputs.query_lens, inputs.seq_lens, inputs.block_ids, self.device
        )
        i64 = dict(dtype=torch.int64, device=self.device)
        hidden = self.model(
            torch.tensor(inputs.input_ids, **i64), torch.tensor(inputs.positions, **i64), meta, self.kv_caches
        )  # [T, D]
        return hidden, meta

    def _prompt_logprobs(self, s, end: int, hidden: torch.Tensor, req: Request) -> list[TokenLogprob]:
        """Logprobs of prompt tokens start_pos+1 .. (within the prompt) predicted by this chunk's rows."""
        prompt = req.prompt_token_ids
        n = min(len(s.token_ids), len(prompt) - 1 - s.start_pos)  # rows whose next token is a prompt token
        if n <= 0:
            return []
        first = end - len(s.token_ids)
        logits = self.model.compute_logits(hidden[first : first + n])  # [n, V]
        targets = torch.tensor(prompt[s.start_pos + 1 : s.start_pos + 1 + n], device=logits.device)  # [n]
        chosen, tops = logprobs_of(logits, targets, req.sampling_params.prompt_logprobs or 0)
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(targets.tolist(), chosen, tops)]
