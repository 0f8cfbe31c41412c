"""The C decode attention against the CPU backend's gather + SDPA path (its reference), and the backend's
choice of it: float32 decode rows where the library loads, PyTorch's SDPA for everything else."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import decode
from kernels.attention.cpu import CpuAttentionBackend
from kernels.backend import get_attention_backend
from tests.kernels.common import make_paged_batch

SDPA = get_attention_backend("cpu_sdpa")
CPU = get_attention_backend("cpu")

needs_kernel = pytest.mark.skipif(
    decode.library() is None, reason="this CPU or machine cannot run the C decode attention (AVX-512 and cc needed)"
)


def _queries(num_tokens: int, heads: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(num_tokens, heads, dim, generator=torch.Generator().manual_seed(seed))  # [T, Hq, D]


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """One entry per call of the C kernel the test makes (the kernel still runs)."""
    calls: list[int] = []
    real = decode.paged_decode
    monkeypatch.setattr(decode, "paged_decode", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_kernel
@pytest.mark.parametrize("window", [None, 1, 7, 40])
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "dv"),
    [(8, 2, 16, 16), (9, 3, 64, 64), (5, 5, 24, 8), (12, 2, 72, 40), (4, 1, 8, 128)],
)
@pytest.mark.parametrize("seq_lens", [[1, 30, 17, 64], [23], [130, 5, 131, 129]])
def test_the_kernel_matches_gathered_sdpa(seq_lens, hq, hkv, d, dv, window, kernel_calls):
    """Ragged lengths across 16-key tails, GQA groups of 1 to 6, head dims that are not multiples of 16, and
    shuffled blocks with NaN in every slot no sequence owns: nothing outside a context is read."""
    batch = make_paged_batch([1] * len(seq_lens), seq_lens, {"k": (hkv, d), "v": (hkv, dv)}, num_blocks=160)
    q = _queries(len(seq_lens), hq, d)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, d**-0.5)
    got = CPU.paged_attention(*args, sliding_window=window)
    assert kernel_calls and got.shape == (len(seq_lens), hq, dv) and not got.isnan().any()
    torch.testing.assert_close(got, SDPA.paged_attention(*args, sliding_window=window), atol=2e-6, rtol=2e-5)


@needs_kernel
def test_decode_rows_of_a_mixed_batch_run_on_it(kernel_calls):
    batch = make_paged_batch([1, 7, 1, 5], [9, 7, 61, 23], {"k": (2, 16), "v": (2, 16)}, num_blocks=48)
    q = _queries(batch.meta.num_tokens, 8, 16)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, 0.25)
    got = CPU.paged_attention(*args)
    assert kernel_calls == [1]
    torch.testing.assert_close(got, SDPA.paged_attention(*args), atol=2e-6, rtol=2e-5)


@needs_kernel
@pytest.mark.parametrize("window", [None, 5])
def test_whole_prompts_run_on_it_row_by_row_beside_decode_rows(window, kernel_calls):
    """Each prompt row sees the keys up to its own position (and within the window), as causal SDPA does."""
    batch = make_paged_batch([9, 1, 33, 1], [9, 40, 33, 17], {"k": (2, 24), "v": (2, 8)}, num_blocks=48)
    q = _queries(batch.meta.num_tokens, 6, 24)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, 24**-0.5)
    got = CPU.paged_attention(*args, sliding_window=window)
    assert kernel_calls == [1] and not got.isnan().any()
    torch.testing.assert_close(got, SDPA.paged_attention(*args, sliding_window=window), atol=2e-6, rtol=2e-5)


@needs_kernel
def test_a_chunk_over_the_kernels_area_runs_sdpa(kernel_calls):
    """9 queries over 9 keys (81) go to SDPA under an area of 64; the decode row (30 keys) stays on the kernel."""
    batch = make_paged_batch([9, 1], [9, 30], {"k": (2, 16), "v": (2, 16)})
    q = _queries(batch.meta.num_tokens, 4, 16)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, 0.25)
    got = CpuAttentionBackend(kernel_area=64).paged_attention(*args)
    assert kernel_calls == [1]
    torch.testing.assert_close(got, SDPA.paged_attention(*args), atol=2e-6, rtol=2e-5)


@needs_kernel
def test_strided_queries_and_a_value_view_of_the_keys(kernel_calls):
    """MLA's shape: one kv head whose V is the first Dv features of K, and queries that are a view."""
    batch = make_paged_batch([1, 1, 1], [40, 3, 17], {"latent": (1, 40)}, num_blocks=32)
    cache = batch.caches["latent"]  # [NB, BS, 1, 40]
    q = _queries(3, 6, 80)[..., 8:48]  # [3, 6, 40], rows and heads 80 apart
    tables, first, lens = batch.meta.block_tables, torch.zeros(3, dtype=torch.long), batch.meta.seq_lens
    got = decode.paged_decode(q, cache, cache[..., :32], tables, first, lens, 0.2)
    want = SDPA._decode(q, SDPA._plan(batch.meta, None).decode, cache, None, 32, 0.2)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_what_it_cannot_take_runs_sdpa(kernel_calls):
    """bfloat16, and a cache whose blocks are not evenly apart (every other block of a larger one)."""
    batch = make_paged_batch([1, 1], [12, 30], {"k": (2, 16), "v": (2, 16)})
    k, v = batch.caches["k"], batch.caches["v"]
    q = _queries(2, 4, 16)
    want = SDPA.paged_attention(q, k, v, batch.meta, 0.25)
    bf16 = CPU.paged_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), batch.meta, 0.25)
    torch.testing.assert_close(bf16.float(), want, atol=3e-2, rtol=3e-2)
    spaced = torch.zeros(2 * k.shape[0], *k.shape[1:])
    spaced[::2] = k
    assert not decode.fits(q, spaced[::2], v)
    assert torch.equal(CPU.paged_attention(q, spaced[::2], v, batch.meta, 0.25), want) and kernel_calls == []


def test_without_the_library_the_backend_runs_sdpa(monkeypatch, kernel_calls):
    monkeypatch.setattr(decode, "library", lambda: None)
    batch = make_paged_batch([1, 1], [12, 30], {"k": (2, 16), "v": (2, 16)})
    q = _queries(2, 4, 16)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, 0.25)
    assert torch.equal(CPU.paged_attention(*args), SDPA.paged_attention(*args)) and kernel_calls == []


@needs_kernel
def test_its_tensors_are_made_beside_the_cache_whatever_the_default_device(kernel_calls):
    batch = make_paged_batch([1, 1], [12, 30], {"k": (2, 16), "v": (2, 16)})
    q = _queries(2, 4, 16)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, 0.25)
    with torch.device("meta"):  # a plan or output made on the default device would be meta: no memory to write
        got = CPU.paged_attention(*args)
    assert kernel_calls and got.device.type == "cpu"
    torch.testing.assert_close(got, SDPA.paged_attention(*args), atol=2e-6, rtol=2e-5)
