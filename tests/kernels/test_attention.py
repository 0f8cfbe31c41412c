"""Paged attention: reference anchored to dense attention, CPU path against the reference."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from kernels.attention.reference import attention_mask
from kernels.backend import AttentionBackend, get_attention_backend
from kernels.metadata import AttentionMetadata
from tests.kernels.common import make_paged_batch

REF = get_attention_backend("reference")
CPU = get_attention_backend("cpu")
SDPA = get_attention_backend("cpu_sdpa")  # "cpu" without its C decode kernel: the torch path for decode rows

# (query_lens, seq_lens): decode rows, a fresh prefill, chunked prefills, a long context over many blocks.
MIXED = ([1, 7, 1, 5, 1, 16, 3], [9, 7, 1, 23, 61, 16, 40])


def _queries(meta: AttentionMetadata, heads: int, dim: int, dtype=torch.float32, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(meta.num_tokens, heads, dim, generator=gen).to(dtype)  # [T, Hq, D]


def _dense_expected(q, batch, scale, window, num_q_heads):
    """Attention computed straight from the dense contexts (no cache involved), float64."""
    out = []
    for b, (q_len, s_len) in enumerate(zip(batch.meta.query_lens_cpu, batch.meta.seq_lens_cpu)):
        start = int(batch.meta.query_start_loc[b])
        k, v = batch.contexts[b]["k"].double(), batch.contexts[b]["v"].double()  # [S, Hkv, D]
        group = num_q_heads // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        allowed = attention_mask(torch.arange(s_len - q_len, s_len), torch.arange(s_len), window)
        o = F.scaled_dot_product_attention(
            q[start : start + q_len].double().transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=allowed,
            scale=scale,
        )
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def test_factory():
    assert isinstance(CPU, AttentionBackend) and CPU.name == "cpu" and REF.name == "reference"
    assert get_attention_backend().name == "cpu"
    with pytest.raises(ValueError, match="reference"):
        get_attention_backend("triton")


def test_reference_matches_dense_causal_sdpa():
    """One sequence, contiguous blocks, full prefill: the reference is plain causal attention."""
    s, hq, d = 13, 4, 16
    batch = make_paged_batch([s], [s], {"k": (hq, d), "v": (hq, d)}, contiguous=True, fill="zeros")
    assert batch.block_ids == [[1, 2, 3, 4]]
    q = _queries(batch.meta, hq, d)
    k, v = batch.contexts[0]["k"], batch.contexts[0]["v"]
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.25
    ).transpose(0, 1)
    got = REF.paged_attention(q, batch.caches["k"], batch.caches["v"], batch.meta, 0.25)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 1, 4, 8, 100])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mixed_batch_gqa_vs_dense(backend, window):
    """Mixed prefill/decode rows, Hq/Hkv = 4, Dv != D, shuffled non-contiguous blocks, NaN in unused slots."""
    hq, hkv, d, dv = 8, 2, 16, 12
    batch = make_paged_batch(*MIXED, {"k": (hkv, d), "v": (hkv, dv)}, num_blocks=48)
    assert max(len(b) for b in batch.block_ids) == 16  # the 61-token context spans 16 blocks
    q = _queries(batch.meta, hq, d)
    got = get_attention_backend(backend).paged_attention(
        q, batch.caches["k"], batch.caches["v"], batch.meta, d**-0.5, sliding_window=window
    )
    assert got.shape == (batch.meta.num_tokens, hq, dv) and got.dtype == q.dtype
    expected = _dense_expected(q, batch, d**-0.5, window, hq).float()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "query_lens,seq_lens",
    [
        MIXED,
        ([1, 1, 1, 1], [1, 30, 17, 64]),  # decode only, ragged
        ([1, 1], [12, 12]),  # decode only, equal lengths (no padding mask)
        ([20], [20]),  # single fresh prefill (is_causal fast path)
        ([6, 9], [30, 9]),  # prefill only
    ],
)
def test_cpu_matches_reference(query_lens, seq_lens, window):
    hq, hkv, d = 8, 2, 8
    batch = make_paged_batch(query_lens, seq_lens, {"k": (hkv, d), "v": (hkv, d)}, num_blocks=64, seed=3)
    q = _queries(batch.meta, hq, d)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, 0.3)
    torch.testing.assert_close(
        CPU.paged_attention(*args, sliding_window=window),
        REF.paged_attention(*args, sliding_window=window),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("contiguous,reads_in_place", [(True, True), (False, False)])
def test_one_stream_decode_reads_consecutive_blocks_in_place(contiguous, reads_in_place, window):
    """One decode row whose blocks are consecutive reads its keys as a slice of the cache (no gather); shuffled
    blocks are gathered. Both equal the reference, and nothing past the context (NaN garbage) is read."""
    hq, hkv, d = 8, 2, 8
    batch = make_paged_batch([1], [23], {"k": (hkv, d), "v": (hkv, d)}, contiguous=contiguous, seed=4)
    q = _queries(batch.meta, hq, d)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, 0.3)
    got = SDPA.paged_attention(*args, sliding_window=window)
    assert (SDPA._plan(batch.meta, window).decode.run is not None) == reads_in_place
    torch.testing.assert_close(got, REF.paged_attention(*args, sliding_window=window), atol=1e-5, rtol=1e-5)


def test_one_stream_decode_over_strided_caches_gathers_its_run():
    """K and V as halves of one packed cache (not contiguous): a run of consecutive blocks is gathered instead."""
    hkv, d = 2, 8
    batch = make_paged_batch([1], [19], {"kv": (hkv, 2 * d)}, contiguous=True, seed=5)
    k_cache, v_cache = batch.caches["kv"][..., :d], batch.caches["kv"][..., d:]  # [NB, BS, Hkv, D] strided
    q = _queries(batch.meta, 4, d)
    args = (q, k_cache, v_cache, batch.meta, 0.3)
    got = SDPA.paged_attention(*args)
    assert SDPA._plan(batch.meta, None).decode.run is not None
    torch.testing.assert_close(got, REF.paged_attention(*args), atol=1e-5, rtol=1e-5)


def test_cpu_matches_reference_bf16():
    hq, hkv, d = 8, 2, 16
    batch = make_paged_batch(*MIXED, {"k": (hkv, d), "v": (hkv, d)}, num_blocks=48, dtype=torch.bfloat16)
    q = _queries(batch.meta, hq, d, dtype=torch.bfloat16)
    for window in (None, 6):
        args = (q, batch.caches["k"], batch.caches["v"], batch.meta, d**-0.5)
        got, ref = CPU.paged_attention(*args, sliding_window=window), REF.paged_attention(*args, sliding_window=window)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_sliding_window_matches_transformers_mask():
    """W counts the query itself: position p sees p-W+1 .. p (transformers' sliding_window_overlay)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    for window in (1, 3, 4):
        fn = sliding_window_causal_mask_function(window)
        pos = torch.arange(10)
        hf = fn(torch.tensor(0), torch.tensor(0), pos[:, None], pos[None, :])  # [Q, K] bool
        assert torch.equal(attention_mask(torch.arange(10), torch.arange(10), window), hf)
    assert attention_mask(torch.tensor([5]), torch.arange(10), 3)[0].nonzero().flatten().tolist() == [3, 4, 5]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sliding_window_pinned_end_to_end(backend):
    """With zero queries attention is a plain average of the visible values; one-hot values reveal which."""
    s, window = 10, 3
    for q_len in (1, 4):
        meta = AttentionMetadata.build(4, [q_len], [s], [[5, 2, 7]])
        k_cache = torch.randn(8, 4, 1, s)
        v_cache = torch.full((8, 4, 1, s), float("nan"))
        get_attention_backend("reference").write_kv(
            v_cache, torch.eye(s)[:, None, :], AttentionMetadata.build(4, [s], [s], [[5, 2, 7]]).slot_mapping
        )
        q = torch.zeros(q_len, 1, s)
        out = get_attention_backend(backend).paged_attention(q, k_cache, v_cache, meta, 1.0, sliding_window=window)
        last = out[-1, 0]  # query at position 9
        torch.testing.assert_close(last, torch.tensor([0.0] * 7 + [1 / 3] * 3))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_write_kv_then_attend_ignores_garbage(backend):
    """write_kv into a zero cache and into a garbage cache: identical, finite results (no reads past seq_len)."""
    impl = get_attention_backend(backend)
    hq, hkv, d = 4, 1, 8
    query_lens, seq_lens = [1, 6, 1], [7, 6, 13]
    block_ids = [[9, 3], [4, 11], [2, 8, 6, 1]]
    full = AttentionMetadata.build(4, seq_lens, seq_lens, block_ids)
    meta = AttentionMetadata.build(4, query_lens, seq_lens, block_ids)
    gen = torch.Generator().manual_seed(7)
    k_new, v_new = torch.randn(2, sum(seq_lens), hkv, d, generator=gen)
    q = torch.randn(meta.num_tokens, hq, d, generator=gen)
    results = []
    for fill in (0.0, float("nan"), 1e4):
        k_cache, v_cache = torch.full((12, 4, hkv, d), fill), torch.full((12, 4, hkv, d), fill)
        impl.write_kv(k_cache, k_new, full.slot_mapping)
        impl.write_kv(v_cache, v_new, full.slot_mapping)
        for w in (None, 3):
            results.append(impl.paged_attention(q, k_cache, v_cache, meta, 0.5, sliding_window=w))
    assert all(torch.isfinite(r).all() for r in results)
    torch.testing.assert_close(results[0], results[2], atol=0, rtol=0)
    torch.testing.assert_close(results[0], results[4], atol=0, rtol=0)
    torch.testing.assert_close(results[1], results[3], atol=0, rtol=0)


def test_write_kv_slots_and_backends_agree():
    slots = torch.tensor([5, 0, 13, 7, 22])
    new = torch.randn(5, 2, 3)
    caches = []
    for backend in ("reference", "cpu"):
        cache = torch.zeros(6, 4, 2, 3)
        get_attention_backend(backend).write_kv(cache, new, slots)
        caches.append(cache)
        flat = cache.view(24, 2, 3)
        torch.testing.assert_close(flat[slots], new)
        untouched = torch.ones(24, dtype=torch.bool)
        untouched[slots] = False
        assert (flat[untouched] == 0).all()
    torch.testing.assert_close(caches[0], caches[1], atol=0, rtol=0)


def test_cpu_write_kv_into_strided_views():
    """Caches that are views of a larger buffer (per-layer slices, k/v halves of one entry) are written in place."""
    slots = torch.tensor([3, 9, 1])
    new = torch.randn(3, 2, 4)
    kv = torch.zeros(5, 4, 2, 8)  # [NB, BS, H, D_k + D_v] packed
    k_view = kv[..., :4]  # non-contiguous: NB and BS still mergeable
    CPU.write_kv(k_view, new, slots)
    torch.testing.assert_close(kv.view(20, 2, 8)[slots, :, :4], new)
    layers = torch.zeros(4, 5, 2, 8)  # [BS, NB, H, D] then transposed: NB/BS not mergeable into a view
    odd = layers.transpose(0, 1)  # [NB=5, BS=4, 2, 8]
    CPU.write_kv(odd, torch.randn(3, 2, 8), slots)
    ref = torch.zeros(5, 4, 2, 8)
    REF.write_kv(ref, odd.reshape(20, 2, 8)[slots], slots)
    torch.testing.assert_close(odd, ref)


def test_the_config_offers_exactly_the_backends_the_factory_builds():
    from engine.config import ATTENTION_BACKENDS

    assert [get_attention_backend(name).name for name in ATTENTION_BACKENDS] == list(ATTENTION_BACKENDS)
    with pytest.raises(ValueError, match=re.escape(f"choices: {sorted(ATTENTION_BACKENDS)}")):  # and no others
        get_attention_backend("flash")
