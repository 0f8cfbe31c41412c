"""Reference paged attention: the spec. Slow, explicit, float32 math.

Per sequence: walk the block table to gather the context's keys/values,
build the causal (+ sliding window) mask by hand, softmax in float32.

Keys before the earliest one any query of the chunk can see (``seq_len - query_len - W + 1`` with a
sliding window ``W``) are never gathered: their blocks may already be freed and replaced by the null
block, whose contents are garbage (NaN). Masking after the fact would not do: ``0 * NaN`` is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.backend import AttentionBackend
from kernels.metadata import AttentionMetadata


def gather_context(cache: Tensor, block_table: Tensor, seq_len: int, first: int = 0) -> Tensor:
    """Entries of positions first..seq_len-1 of one sequence, in order.

    cache: [NB, BS, *entry]; block_table: [max_blocks] -> [seq_len - first, *entry]
    """
    block_size = cache.shape[1]
    rows = []
    for pos in range(first, seq_len):
        block = int(block_table[pos // block_size])
        rows.append(cache[block, pos % block_size])
    return torch.stack(rows)


def attention_mask(query_pos: Tensor, key_pos: Tensor, sliding_window: int | None) -> Tensor:
    """True where a query may attend a key. query_pos: [Q]; key_pos: [S] -> [Q, S]

    Causal: k <= p. Sliding window W (transformers' sliding_window_overlay):
    also k > p - W, i.e. the W most recent positions including p itself.
    """
    allowed = key_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        allowed &= key_pos[None, :] > query_pos[:, None] - sliding_window
    return allowed


def masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Plain attention, float32. q: [Q, H, D]; k: [S, H, D]; v: [S, H, Dv]; allowed: [Q, S] -> [Q, H, Dv]"""
    scores = torch.einsum("qhd,shd->hqs", q.float(), k.float()) * scale  # [H, Q, S]
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqs,shd->qhd", probs, v.float())


class ReferenceAttentionBackend(AttentionBackend):
    name = "reference"

    def write_kv(self, cache: Tensor, new: Tensor, slot_mapping: Tensor) -> None:
        # cache [NB, BS, *entry]; new [T, *entry]
        block_size = cache.shape[1]
        for t in range(new.shape[0]):
            slot = int(slot_mapping[t])
            cache[slot // block_size, slot % block_size] = new[t].to(cache.dtype)

    def _per_sequence(self, meta: AttentionMetadata, window: int | None = None):
        """Yields (row_start, query_len, seq_len, block_table_row, query_pos [Q], key_pos [S]).

        key_pos starts at the earliest key any of the queries sees."""
        for b in range(meta.num_seqs):
            q_len, s_len = meta.query_lens_cpu[b], meta.seq_lens_cpu[b]
            start = int(meta.query_start_loc[b])
            dev = meta.block_tables.device
            query_pos = torch.arange(s_len - q_len, s_len, device=dev)
            first = 0 if window is None else max(0, s_len - q_len - window + 1)  # earliest visible key
            key_pos = torch.arange(first, s_len, device=dev)
            yield start, q_len, s_len, meta.block_tables[b], query_pos, key_pos

    def paged_attention(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> Tensor:
        # q [T, Hq, D]; k_cache [NB, BS, Hkv, D]; v_cache [NB, BS, Hkv, Dv]
        num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)
        group = num_q_heads // num_kv_heads
        out = q.new_empty(q.shape[0], num_q_heads, v_cache.shape[-1])  # [T, Hq, Dv]
        for start, q_len, s_len, table, query_pos, key_pos in self._per_sequence(meta, sliding_window):
            first = int(key_pos[0])
            k = gather_context(k_cache, table, s_len, first)  # [S, Hkv, D]
            v = gather_context(v_cache, table, s_len, first)  # [S, Hkv, Dv]
            # query head h reads kv head h // group (== transformers' repeat_kv)
            k = k.repeat_interleave(group, dim=1)  # [S, Hq, D]
            v = v.repeat_interleave(group, dim=1)  # [S, Hq, Dv]
            allowed = attention_mask(query_pos, key_pos, sliding_window)  # [Q, S]
            o = masked_softmax_attention(q[start : start + q_len], k, v, allowed, scale)
            out[start : start + q_len] = o.to(out.dtype)
        return out

    def mla_paged_attention(
        self,
        q_nope: Tensor,
        q_rope: Tensor,
        latent_cache: Tensor,
        meta: AttentionMetadata,
        w_uk: Tensor,
        w_uv: Tensor,
        scale: float,
    ) -> Tensor:
        # q_nope [T, H, Dn]; q_rope [T, H, Dr]; latent_cache [NB, BS, L + Dr]; w_uk [H, Dn, L]; w_uv [H, Dv, L]
        num_heads, _, latent_dim = w_uk.shape
        out = q_nope.new_empty(q_nope.shape[0], num_heads, w_uv.shape[1])  # [T, H, Dv]
        for start, q_len, s_len, table, query_pos, key_pos in self._per_sequence(meta):
            entries = gather_context(latent_cache, table, s_len).float()  # [S, L + Dr]
            c, k_rope = entries[:, :latent_dim], entries[:, latent_dim:]  # [S, L], [S, Dr]
            # Expand per head exactly like Mistral4Attention.expand_kv (kv_b_proj on the latent).
            k_nope = torch.einsum("sl,hnl->shn", c, w_uk.float())  # [S, H, Dn]
            v = torch.einsum("sl,hvl->shv", c, w_uv.float())  # [S, H, Dv]
            k = torch.cat([k_nope, k_rope[:, None, :].expand(-1, num_heads, -1)], dim=-1)  # [S, H, Dn + Dr]
            q = torch.cat([q_nope[start : start + q_len], q_rope[start : start + q_len]], dim=-1)  # [Q, H, Dn + Dr]
            allowed = attention_mask(query_pos, key_pos, None)  # [Q, S]
            o = masked_softmax_attention(q, k, v, allowed, scale)  # [Q, H, Dv]
            out[start : start + q_len] = o.to(out.dtype)
        return out
