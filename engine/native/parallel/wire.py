"""The messages rank 0 sends ranks 1.. of an expert-parallel group, as int64 tensors.

Every message starts with a fixed header of ``HEADER_LEN`` int64s
(``[kind, a, b, c, d, e]``). A step's header is followed by one payload
tensor holding its inputs back to back::

    input_ids [T] | positions [T] | query_lens [B] | seq_lens [B] | block tables [B, W] (padded with -1)

Plain integers in two tensors: no pickling, and the same code works for any backend.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from enum import IntEnum

import torch
from torch import Tensor

from engine.native.runner import StepInputs

HEADER_LEN = 6
_PAD = -1  # block-table padding; real block ids are >= 0


class Kind(IntEnum):
    # 0 is no kind: a header of zeros (what ranks 1.. contribute) is never a valid message
    HELLO = 1
    STEP = 2
    KEEPALIVE = 3
    STOP = 4


@dataclass(frozen=True)
class Hello:
    """Rank 0's first message: how to size the paged cache, and what model every rank must hold."""

    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    num_expert_params: int  # routed-expert parameters of the whole model

    def header(self) -> list[int]:
        return [Kind.HELLO, *astuple(self)]

    @staticmethod
    def of(header: list[int]) -> Hello:
        return Hello(*header[1:HEADER_LEN])


def header(kind: Kind) -> list[int]:
    return [kind] + [0] * (HEADER_LEN - 1)


def step_header(inputs: StepInputs) -> list[int]:
    width = max((len(b) for b in inputs.block_ids), default=0)
    return [Kind.STEP, len(inputs.input_ids), len(inputs.query_lens), width, 0, 0]


def pack_step(inputs: StepInputs, width: int, device: torch.device) -> Tensor:
    """The payload of a step whose header says ``width`` blocks per table row: [2T + 2B + B*W] int64."""
    flat = inputs.input_ids + inputs.positions + inputs.query_lens + inputs.seq_lens
    for row in inputs.block_ids:
        flat += row + [_PAD] * (width - len(row))
    return torch.tensor(flat, dtype=torch.int64, device=device)


def payload_len(step_header: list[int]) -> int:
    _, num_tokens, num_seqs, width, *_ = step_header
    return 2 * num_tokens + 2 * num_seqs + num_seqs * width


def unpack_step(step_header: list[int], payload: Tensor) -> StepInputs:
    _, t, b, w, *_ = step_header
    flat = payload.tolist()
    ids, pos, q, s, table = (
        flat[:t],
        flat[t : 2 * t],
        flat[2 * t : 2 * t + b],
        flat[2 * t + b : 2 * t + 2 * b],
        flat[2 * t + 2 * b :],
    )
    rows = [table[i * w : (i + 1) * w] for i in range(b)]
    return StepInputs(ids, pos, q, s, [[blk for blk in row if blk != _PAD] for row in rows])
