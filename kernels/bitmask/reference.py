"""The plain definition of a token bitmask, one token at a time, for tests of ``kernels.bitmask``."""

from __future__ import annotations

import torch


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """A copy of ``logits`` [N, V] with token t of row ``rows[r]`` at -inf unless bit t%32 of word t//32 of
    ``bitmask[r]`` is set."""
    out = logits.clone()
    words = bitmask.tolist()
    for r, row in enumerate(rows):
        for t in range(logits.shape[1]):
            if not (words[r][t // 32] >> (t % 32)) & 1:
                out[row, t] = float("-inf")
    return out
