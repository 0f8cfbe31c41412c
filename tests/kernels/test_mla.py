"""MLA paged attention: reference anchored to transformers' Mistral4Attention.expand_kv, CPU (absorbed) vs reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.backend import get_attention_backend
from tests.kernels.common import make_paged_batch

REF = get_attention_backend("reference")
CPU = get_attention_backend("cpu")
H, DN, DR, DV, L = 4, 8, 4, 6, 16


def _weights(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    kv_b = torch.randn(H * (DN + DV), L, generator=gen) * L**-0.5  # kv_b_proj.weight [H*(Dn+Dv), L]
    w_uk, w_uv = kv_b.view(H, DN + DV, L).split([DN, DV], dim=1)  # [H, Dn, L], [H, Dv, L]
    return kv_b, w_uk.to(dtype), w_uv.to(dtype)


def _queries(num_tokens, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_tokens, H, DN, generator=gen).to(dtype),  # [T, H, Dn]
        torch.randn(num_tokens, H, DR, generator=gen).to(dtype),
    )  # [T, H, Dr]


def test_reference_matches_transformers_expand_kv():
    from transformers import Mistral4Config
    from transformers.models.mistral4.modeling_mistral4 import Mistral4Attention

    config = Mistral4Config(
        hidden_size=32,
        num_attention_heads=H,
        num_key_value_heads=H,
        q_lora_rank=None,
        kv_lora_rank=L,
        qk_rope_head_dim=DR,
        qk_nope_head_dim=DN,
        v_head_dim=DV,
    )
    attn = Mistral4Attention(config, layer_idx=0)
    kv_b, w_uk, w_uv = _weights()
    with torch.no_grad():
        attn.kv_b_proj.weight.copy_(kv_b)
    s = 11
    batch = make_paged_batch([s], [s], {"latent": (L + DR,)}, block_size=4, num_blocks=8)
    c, k_rope = batch.contexts[0]["latent"].split([L, DR], dim=-1)  # [S, L], [S, Dr]
    with torch.no_grad():
        k, v = attn.expand_kv(c[None, None], k_rope[None, None])  # [1, H, S, Dn+Dr], [1, H, S, Dv]
    q_nope, q_rope = _queries(s)
    q = torch.cat([q_nope, q_rope], dim=-1).transpose(0, 1)[None]  # [1, H, S, Dn+Dr]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)[0].transpose(0, 1)
    got = REF.mla_paged_attention(q_nope, q_rope, batch.caches["latent"], batch.meta, w_uk, w_uv, 0.3)
    assert got.shape == (s, H, DV)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "query_lens,seq_lens",
    [
        ([1, 7, 1, 5, 1, 16, 3], [9, 7, 1, 23, 61, 16, 40]),  # mixed, one context over 16 shuffled blocks
        ([1, 1, 1], [1, 33, 20]),  # decode only
        ([12], [12]),  # fresh prefill
    ],
)
def test_cpu_absorbed_matches_reference(query_lens, seq_lens):
    batch = make_paged_batch(query_lens, seq_lens, {"latent": (L + DR,)}, num_blocks=48, seed=5)
    _, w_uk, w_uv = _weights()
    q_nope, q_rope = _queries(batch.meta.num_tokens)
    args = (q_nope, q_rope, batch.caches["latent"], batch.meta, w_uk, w_uv, (DN + DR) ** -0.5)
    got, ref = CPU.mla_paged_attention(*args), REF.mla_paged_attention(*args)
    assert got.shape == ref.shape == (batch.meta.num_tokens, H, DV)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cpu_absorbed_one_stream_decode_in_place_matches_reference():
    """One decode row over consecutive blocks: the latent cache is read as a slice, V as its first L features."""
    batch = make_paged_batch([1], [21], {"latent": (L + DR,)}, num_blocks=16, seed=6, contiguous=True)
    _, w_uk, w_uv = _weights()
    q_nope, q_rope = _queries(batch.meta.num_tokens)
    args = (q_nope, q_rope, batch.caches["latent"], batch.meta, w_uk, w_uv, (DN + DR) ** -0.5)
    got, ref = CPU.mla_paged_attention(*args), REF.mla_paged_attention(*args)
    assert CPU._plan(batch.meta, None).decode.run is not None
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cpu_absorbed_matches_reference_bf16():
    batch = make_paged_batch([1, 6, 1], [20, 6, 9], {"latent": (L + DR,)}, num_blocks=16, dtype=torch.bfloat16)
    _, w_uk, w_uv = _weights(dtype=torch.bfloat16)
    q_nope, q_rope = _queries(batch.meta.num_tokens, dtype=torch.bfloat16)
    args = (q_nope, q_rope, batch.caches["latent"], batch.meta, w_uk, w_uv, (DN + DR) ** -0.5)
    got, ref = CPU.mla_paged_attention(*args), REF.mla_paged_attention(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_mla_write_kv_then_attend():
    """Latent entries written by each backend's write_kv; unused slots hold NaN."""
    from kernels.metadata import AttentionMetadata

    block_ids = [[3, 7], [5, 1, 6]]
    full = AttentionMetadata.build(4, [5, 10], [5, 10], block_ids)
    meta = AttentionMetadata.build(4, [1, 3], [5, 10], block_ids)
    entries = torch.randn(15, L + DR)
    _, w_uk, w_uv = _weights()
    q_nope, q_rope = _queries(meta.num_tokens)
    outs = []
    for impl in (REF, CPU):
        cache = torch.full((8, 4, L + DR), float("nan"))
        impl.write_kv(cache, entries, full.slot_mapping)
        outs.append(impl.mla_paged_attention(q_nope, q_rope, cache, meta, w_uk, w_uv, 0.25))
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
