"""Token bitmasks on logits, constrained decoding's per-step op (``engine.structured`` fills the masks): unpack
the int32 words to booleans, then one masked fill over the constrained rows."""

from __future__ import annotations

import torch


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set to -inf, in place, each token that ``bitmask`` does not allow, in the logits rows ``rows`` only.

    logits: [N, V] float; bitmask: [R, W] int32 with W = ceil(V / 32), bit ``t % 32`` of word ``t // 32``
    allowing token t (on any device: it is moved to the logits'); rows: [R] int64, which logits row each
    mask row constrains. Rows not in ``rows`` are left untouched, bit for bit.
    """
    if rows.numel() == 0:
        return
    n_vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # [32]
    words = bitmask.to(logits.device)  # [R, W]
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :n_vocab]  # [R, W*32] -> [R, V]
    rows = rows.to(logits.device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))  # [R, V]
