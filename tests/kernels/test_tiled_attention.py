"""The CPU backend's tiled long-context path (tiny tiles, so short contexts span many) against the reference.

Both tile kernels are checked: the aten flash op (CPU) and the portable matmul path (what CUDA runs).
Null-block poisoning: blocks wholly before a sequence's sliding window may be block 0, full of NaN.
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention.cpu import CpuAttentionBackend
from kernels.attention.tiled import TiledPlan
from kernels.backend import get_attention_backend
from tests.kernels.common import make_paged_batch
from tests.kernels.test_attention import _dense_expected, _queries

REF = get_attention_backend("reference")

# (query_lens, seq_lens), block size 4: decode rows, a fresh prefill, chunks starting mid-block
# (23 - 5 = 18, 40 - 3 = 37), contexts ending mid-block (61, 23, 9), one chunk starting on a block edge.
BATCHES = [
    ([1, 7, 1, 5, 1, 16, 3], [9, 7, 1, 23, 61, 16, 40]),
    ([6, 9], [30, 9]),
    ([13], [37]),
    ([1], [50]),
    ([8], [48]),
]


def _tiled(key_tile: int, flash: bool) -> CpuAttentionBackend:
    # decode_from=key_tile: long decode rows take the tiled path too
    return CpuAttentionBackend(key_tile=key_tile, query_tile=3, decode_from=key_tile, cpu_flash=flash)


@pytest.mark.parametrize("flash", [True, False], ids=["flash_op", "portable"])
@pytest.mark.parametrize("key_tile", [4, 8, 5])
@pytest.mark.parametrize("window", [None, 1, 3, 4, 8, 100])
@pytest.mark.parametrize("batch_shape", BATCHES, ids=[f"b{i}" for i in range(len(BATCHES))])
def test_tiled_gqa_matches_reference(batch_shape, window, key_tile, flash):
    hq, hkv, d, dv = 8, 2, 8, 6  # GQA group 4, V narrower than K
    batch = make_paged_batch(*batch_shape, {"k": (hkv, d), "v": (hkv, dv)}, num_blocks=64, seed=3)
    q = _queries(batch.meta, hq, d)
    args = (q, batch.caches["k"], batch.caches["v"], batch.meta, 0.3)
    got = _tiled(key_tile, flash).paged_attention(*args, sliding_window=window)
    torch.testing.assert_close(got, REF.paged_attention(*args, sliding_window=window), atol=1e-5, rtol=1e-5)


def test_tiled_path_is_taken_and_tiles_are_bounded():
    """A 61-token context with key_tile 8 is planned as tiles of at most 8 keys, none of them before the window."""
    batch = make_paged_batch([5], [61], {"k": (1, 4), "v": (1, 4)}, num_blocks=32)
    slots = torch.arange(61 - 5 - 10 + 1, 61)  # window 10: keys 46..60
    plan = TiledPlan.build(0, 5, slots, 61, 10, 8)
    spans = [(t.k0, t.k1) for t in plan.tiles]
    assert all(0 < k1 - k0 <= 8 for k0, k1 in spans) and spans[0][0] == 0 and spans[-1][1] == len(slots)
    assert all(op.bias is None or op.bias.shape[0] < 8 for t in plan.tiles for op in t.ops)
    cpu = _tiled(8, True)
    q = _queries(batch.meta, 1, 4)
    cpu.paged_attention(q, batch.caches["k"], batch.caches["v"], batch.meta, 0.5, sliding_window=10)
    (step_plan,) = batch.meta.derived.values()
    assert len(step_plan.tiled) == 1 and not step_plan.prefill


@pytest.mark.parametrize("flash", [True, False], ids=["flash_op", "portable"])
def test_tiled_bf16(flash):
    hq, hkv, d = 8, 2, 16
    batch = make_paged_batch(*BATCHES[0], {"k": (hkv, d), "v": (hkv, d)}, num_blocks=48, dtype=torch.bfloat16)
    q = _queries(batch.meta, hq, d, dtype=torch.bfloat16)
    for window in (None, 6):
        args = (q, batch.caches["k"], batch.caches["v"], batch.meta, d**-0.5)
        got = _tiled(8, flash).paged_attention(*args, sliding_window=window)
        assert got.dtype == torch.bfloat16
        ref = REF.paged_attention(*args, sliding_window=window)
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("flash", [True, False], ids=["flash_op", "portable"])
@pytest.mark.parametrize("key_tile", [4, 7])
@pytest.mark.parametrize("batch_shape", BATCHES, ids=[f"b{i}" for i in range(len(BATCHES))])
def test_tiled_mla_matches_reference(batch_shape, key_tile, flash):
    from tests.kernels.test_mla import DN, DR, L, _weights
    from tests.kernels.test_mla import _queries as mla_queries

    batch = make_paged_batch(*batch_shape, {"latent": (L + DR,)}, num_blocks=48, seed=5)
    _, w_uk, w_uv = _weights()
    q_nope, q_rope = mla_queries(batch.meta.num_tokens)
    args = (q_nope, q_rope, batch.caches["latent"], batch.meta, w_uk, w_uv, (DN + DR) ** -0.5)
    got = _tiled(key_tile, flash).mla_paged_attention(*args)
    torch.testing.assert_close(got, REF.mla_paged_attention(*args), atol=1e-5, rtol=1e-5)


def _free_blocks_before_window(batch, window: int) -> int:
    """Point table entries of blocks wholly before each chunk's window at block 0 and fill it with NaN."""
    bs, freed = batch.meta.block_size, 0
    for b, (q_len, s_len) in enumerate(zip(batch.meta.query_lens_cpu, batch.meta.seq_lens_cpu)):
        first_visible = max(0, s_len - q_len - window + 1)
        for i in range(first_visible // bs):  # blocks whose last position is before first_visible
            batch.meta.block_tables[b, i] = 0
            freed += 1
    for cache in batch.caches.values():
        cache[0] = float("nan")
    return freed


@pytest.mark.parametrize(
    "backend",
    ["reference", "cpu", "cpu_untiled", "tiled_flash_op", "tiled_portable"],
)
@pytest.mark.parametrize("window", [1, 4, 6, 9])
def test_null_blocks_before_the_window_never_contribute(backend, window):
    hq, hkv, d, dv = 8, 2, 8, 6
    batch = make_paged_batch(*BATCHES[0], {"k": (hkv, d), "v": (hkv, dv)}, num_blocks=48, seed=9, fill="huge")
    assert _free_blocks_before_window(batch, window) >= 10
    impl = {"tiled_flash_op": _tiled(4, True), "tiled_portable": _tiled(4, False)}.get(backend)
    impl = impl or get_attention_backend(backend)
    q = _queries(batch.meta, hq, d)
    got = impl.paged_attention(q, batch.caches["k"], batch.caches["v"], batch.meta, d**-0.5, sliding_window=window)
    assert torch.isfinite(got).all()
    expected = _dense_expected(q, batch, d**-0.5, window, hq).float()  # from the dense contexts: no cache
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_long_mla_chunks_go_per_head_and_decode_rows_stay_in_latent_space():
    """With the MLA test dims, b0's 16-query chunk is attended per head in test_tiled_mla_matches_reference."""
    from kernels.attention.cpu import _expansion_pays
    from tests.kernels.test_mla import DN, DV, L

    def plan(q_len: int) -> TiledPlan:
        return TiledPlan(0, q_len, torch.zeros(0, dtype=torch.long))

    assert _expansion_pays(plan(16), L, DN, DV)
    assert not _expansion_pays(plan(1), L, DN, DV)
    assert not _expansion_pays(plan(16), latent_dim=DN, nope_dim=DN, v_dim=DV)  # no smaller in latent space: never
