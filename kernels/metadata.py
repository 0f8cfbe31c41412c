"""What a paged-attention kernel needs to know about one step's batch.

The runner builds one per step; every attention kernel (reference, CPU,
later GPU) takes it. Tokens of all sequences are flattened into one batch
of ``T`` tokens; sequence ``b`` owns rows
``query_start_loc[b]:query_start_loc[b+1]`` and its queries are the *last*
``query_len`` positions of its ``seq_len`` tokens of context.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")


@dataclass
class AttentionMetadata:
    block_size: int
    query_start_loc: torch.Tensor  # [B+1] int64, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int64, context length incl. this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0 (the null block)
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block_id * block_size + offset) per new token
    # Host copies, so kernels can loop and size buffers without device syncs.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Tensors derived from the fields above that every layer of the step would otherwise rebuild
    # (a kernel's gather slots, masks, row indices): filled on first use through ``derive``.
    derived: dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)

    def derive(self, key: Hashable, build: Callable[[], _T]) -> _T:
        """``build()`` on the first call for ``key`` in this step; the same object for every later layer.

        The metadata is rebuilt each step, so nothing derived outlives the batch it describes.
        Keys are owned by the kernel that builds them (e.g. ``("cpu_decode", window)``).
        """
        try:
            return self.derived[key]
        except KeyError:
            value = self.derived[key] = build()
            return value

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_cpu))

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)

    @staticmethod
    def build(
        block_size: int,
        query_lens: list[int],
        seq_lens: list[int],
        block_ids: list[list[int]],
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences whose new tokens are the tail of their context."""
        assert len(query_lens) == len(seq_lens) == len(block_ids)
        starts = [0]
        slots: list[int] = []
        for q, s, blocks in zip(query_lens, seq_lens, block_ids):
            assert 0 < q <= s and len(blocks) * block_size >= s, (q, s, len(blocks))
            starts.append(starts[-1] + q)
            for pos in range(s - q, s):
                slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        width = max((len(b) for b in block_ids), default=0)
        table = [b + [0] * (width - len(b)) for b in block_ids]
        i64 = dict(dtype=torch.int64, device=device)
        return AttentionMetadata(
            block_size=block_size,
            query_start_loc=torch.tensor(starts, **i64),
            seq_lens=torch.tensor(seq_lens, **i64),
            block_tables=torch.tensor(table, **i64).reshape(len(block_ids), width),
            slot_mapping=torch.tensor(slots, **i64),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )
