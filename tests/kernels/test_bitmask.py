"""The token-bitmask op against its one-token-at-a-time definition."""

from __future__ import annotations

import pytest
import torch

from kernels.bitmask import apply_token_bitmask_
from tests.devices import DEVICES, usable


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The definition, one token at a time: a copy of ``logits`` [N, V] with token t of row ``rows[r]`` at -inf
    unless bit t%32 of word t//32 of ``bitmask[r]`` is set."""
    out = logits.clone()
    words = bitmask.tolist()
    for r, row in enumerate(rows):
        for t in range(logits.shape[1]):
            if not (words[r][t // 32] >> (t % 32)) & 1:
                out[row, t] = float("-inf")
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [32, 100, 257])  # a whole word, and vocabularies that end inside one
def test_matches_the_reference_on_the_rows_it_constrains(vocab, device):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[0, 0] = -1  # every bit set, bit 31 (the sign bit) included
    rows = [4, 0, 2]
    expected = apply_token_bitmask_reference(logits, bitmask, rows)
    out = logits.to(usable(device))  # the mask stays on the host, as the sampler hands it over
    apply_token_bitmask_(out, bitmask, torch.tensor(rows))
    out = out.cpu()
    assert torch.equal(out, expected)
    assert torch.equal(out[[1, 3]], logits[[1, 3]])  # rows without a mask: bit for bit
    assert not torch.isinf(out[4, :32]).any() and torch.isinf(out[0]).any()  # all-ones word; a random one


def test_sign_bit_allows_token_31():
    logits = torch.zeros(1, 64)
    bitmask = torch.tensor([[-(2**31), 1]], dtype=torch.int32)  # only tokens 31 and 32
    apply_token_bitmask_(logits, bitmask, torch.tensor([0]))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [31, 32]


def test_no_rows_is_a_no_op():
    logits = torch.randn(2, 40)
    before = logits.clone()
    apply_token_bitmask_(logits, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int64))
    assert torch.equal(logits, before)
