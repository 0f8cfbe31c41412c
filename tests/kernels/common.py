"""Shared builders for kernel tests: paged caches with shuffled blocks and garbage in unused slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.backend import get_attention_backend
from kernels.metadata import AttentionMetadata


def shuffled_block_ids(seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator) -> list[list[int]]:
    """Non-contiguous, shuffled block ids per sequence, never using block 0 (the null/padding block)."""
    need = [-(-s // block_size) for s in seq_lens]
    assert sum(need) <= num_blocks - 1, (need, num_blocks)
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    out, i = [], 0
    for n in need:
        out.append(pool[i : i + n])
        i += n
    return out


def garbage_cache(shape: tuple[int, ...], dtype: torch.dtype, fill: str) -> torch.Tensor:
    if fill == "nan":
        return torch.full(shape, float("nan"), dtype=dtype)
    if fill == "huge":
        return torch.full(shape, 1e4, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


@dataclass
class PagedBatch:
    meta: AttentionMetadata
    block_ids: list[list[int]]
    contexts: list[dict[str, torch.Tensor]]  # per sequence: the dense entries written into each cache
    caches: dict[str, torch.Tensor]


def make_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    entry_shapes: dict[str, tuple[int, ...]],
    *,
    block_size: int = 4,
    num_blocks: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    fill: str = "nan",
    contiguous: bool = False,
    scale: float = 1.0,
) -> PagedBatch:
    """Caches named like entry_shapes (e.g. {"k": (Hkv, D), "v": (Hkv, Dv)}) holding each sequence's whole
    context, written with the reference write_kv; every other slot holds ``fill`` garbage."""
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        block_ids, nxt = [], 1
        for s in seq_lens:
            n = -(-s // block_size)
            block_ids.append(list(range(nxt, nxt + n)))
            nxt += n
    else:
        block_ids = shuffled_block_ids(seq_lens, block_size, num_blocks, gen)
    caches = {
        name: garbage_cache((num_blocks, block_size, *shape), dtype, fill) for name, shape in entry_shapes.items()
    }
    contexts = [
        {name: (torch.randn(s, *shape, generator=gen) * scale).to(dtype) for name, shape in entry_shapes.items()}
        for s in seq_lens
    ]
    full = AttentionMetadata.build(block_size, seq_lens, seq_lens, block_ids)  # slots of every context position
    ref = get_attention_backend("reference")
    for name in entry_shapes:
        ref.write_kv(caches[name], torch.cat([c[name] for c in contexts]), full.slot_mapping)
    meta = AttentionMetadata.build(block_size, query_lens, seq_lens, block_ids)
    return PagedBatch(meta, block_ids, contexts, caches)
