"""CPU paged attention: what the engine runs (plain torch, so CUDA tensors work too: the plans
below are built on the block tables' device).

Built for low per-step overhead:

* ``write_kv``: one ``index_copy_`` into the cache viewed as ``[NB*BS, *entry]``.
* Gathers go through ``index_select`` on the cache viewed as 2-D
  ``[NB*BS, entry_numel]`` rows (several times faster than N-d advanced
  indexing on CPU), touching only slots of positions ``< seq_len`` (and, with
  a sliding window, only the window), so garbage in unused slots is never read.
* in float32 on an AVX-512 CPU, a C kernel that reads K and V in the cache
  blocks (``kernels.attention.decode``) takes every decode row and every prompt
  of up to ``kernel_area`` query-key pairs, one query row at a time, in one call.
* elsewhere, decode rows (query_len == 1), wherever they sit in the batch, are
  served together by one ``[B, S_max]`` gather through the block tables and one
  batched ``scaled_dot_product_attention`` with a padding mask, GQA folding the
  query-head group into SDPA's query-length axis (``[B, Hkv, Hq/Hkv, D]``) so
  K/V are never repeated.
* other prefill / chunked-prefill rows (query_len > 1): one SDPA per sequence
  with ``is_causal`` when the chunk is the whole context, else an explicit
  causal (+ window) mask aligned to the tail of the context.
* MLA uses the weight-absorbed form: queries move into latent space
  (``q_nope @ w_uk``), attention runs as MQA directly over the cached
  ``[latent ; k_rope]`` rows with the latent itself as value, and the result is
  projected out with ``w_uv``. Per-head K/V are never materialized.
* long contexts (a visible span over ``key_tile`` positions, prefill chunks and decode rows alike)
  go to ``kernels.attention.tiled``: the cache is read one key tile at a time and partial results
  are merged by log-sum-exp, so nothing is sized by the context. ``CpuUntiledAttentionBackend``
  keeps the one-gather path for every length (the old behaviour, for benchmarks).
* everything that depends only on the batch (gather slots, padding / causal
  masks, row indices) is planned once per step and sliding window, kept in
  ``meta.derive``, and shared by all layers; a layer only gathers its own
  cache and runs SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.attention import decode
from kernels.attention.tiled import TiledPlan, attend_tiled
from kernels.backend import AttentionBackend
from kernels.metadata import AttentionMetadata


def _slots(block_tables: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """Cache slots of token positions. block_tables [B, W]; positions [B, L] -> [B, L]"""
    return block_tables.gather(1, positions // block_size) * block_size + positions % block_size


def _gather(cache: Tensor, slots: Tensor) -> Tensor:
    """Cache rows at slots. cache [NB, BS, *entry]; slots [...] -> [..., *entry]"""
    entry = cache.shape[2:]
    try:
        rows = cache.view(-1, math.prod(entry))  # [NB*BS, entry_numel]
    except RuntimeError:  # strided cache that can't be viewed 2-D: slower advanced indexing
        return cache.flatten(0, 1)[slots]
    return rows.index_select(0, slots.reshape(-1)).view(*slots.shape, *entry)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _read_kv(
    read: Callable[[Tensor], Tensor], k_cache: Tensor, v_cache: Tensor | None, v_dim: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """K and V as ``read`` takes them from each cache, in dtype; without a V cache, V is K's first v_dim features."""
    k = _as(read(k_cache), dtype)
    v = k[..., :v_dim] if v_cache is None else _as(read(v_cache), dtype)
    return k, v


def _flat_views(*caches: Tensor | None) -> bool:
    """Whether every cache views as [NB*BS, *entry] without a copy (a run is then a slice)."""
    return all(c is None or c.is_contiguous() for c in caches)


def _run_slots(plan: _DecodePlan, device: torch.device) -> Tensor:
    """The decode plan's slots [B, L], from its run when it has one."""
    if plan.slots is not None:
        return plan.slots
    start, length = plan.run  # type: ignore[misc]
    return torch.arange(start, start + length, device=device)[None]  # [1, L]


@dataclass
class _DecodePlan:
    """Where the keys of batched decode rows are. q_len 1 each; L = the longest visible span."""

    slots: Tensor | None  # [B, L] cache slots of each row's visible keys; padding re-reads the last key
    mask: Tensor | None  # [B, 1, 1, L] True for real keys; None when every row sees L keys
    run: tuple[int, int] | None = None  # one row whose keys fill consecutive slots: (first slot, L), read in place

    @staticmethod
    def build(block_tables: Tensor, seq_lens: list[int], block_size: int, window: int | None) -> _DecodePlan:
        # block_tables [B, W]; the plan's tensors go where the block tables are
        spans = [min(s, window) if window is not None else s for s in seq_lens]  # visible keys per sequence
        run = _slot_run(block_tables, seq_lens[0], spans[0], block_size) if len(spans) == 1 else None
        if run is not None:
            return _DecodePlan(None, None, run)
        span_max = max(spans)
        dev = block_tables.device
        offs = torch.arange(span_max, device=dev)  # [L]
        last = torch.tensor(seq_lens, dtype=torch.long, device=dev)[:, None] - 1  # [B, 1]
        span_t = torch.tensor(spans, dtype=torch.long, device=dev)[:, None]  # [B, 1]
        first = last + 1 - span_t  # [B, 1]
        positions = torch.minimum(first + offs, last)  # [B, L]
        mask = None
        if min(spans) != span_max:
            mask = (offs[None, :] < span_t)[:, None, None, :]  # [B, 1, 1, L]
        return _DecodePlan(_slots(block_tables, positions, block_size), mask)


@dataclass
class _PagedRows:
    """Rows the C kernel attends one query at a time, reading keys in the cache blocks: the decode rows and
    the rows of short prefill chunks. Host tensors: the kernel runs on CPU caches only."""

    rows: Tensor | None  # [R] their rows in the batch; None: every row, in order
    tables: Tensor  # [R, W] each row's sequence's block table
    first: Tensor  # [R] the first key each row sees
    lens: Tensor  # [R] keys up to and including the row's own position

    @staticmethod
    def build(meta: AttentionMetadata, seqs: list[int], starts: list[int], window: int | None) -> _PagedRows:
        q_lens, s_lens, dev = meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_tables.device
        as_tensor = partial(torch.tensor, dtype=torch.long, device=dev)  # not the default device
        rows = [r for b in seqs for r in range(starts[b], starts[b] + q_lens[b])]
        owner = [b for b in seqs for _ in range(q_lens[b])]  # each row's sequence
        lens = as_tensor([s_lens[b] - q_lens[b] + 1 + i for b in seqs for i in range(q_lens[b])])
        first = lens - lens.clamp(max=window) if window is not None else torch.zeros_like(lens)
        tables = meta.block_tables if owner == list(range(len(q_lens))) else meta.block_tables[as_tensor(owner)]
        every = rows == list(range(starts[-1]))
        return _PagedRows(None if every else as_tensor(rows), tables.contiguous(), first, lens)


def _slot_run(block_tables: Tensor, seq_len: int, span: int, block_size: int) -> tuple[int, int] | None:
    """(first slot, span) when one sequence's visible keys lie in consecutive blocks (a fresh pool hands
    them out in order): one stream's decode then reads the cache in place, with no gather. Host tables only:
    reading a device's would wait for it."""
    if block_tables.device.type != "cpu":
        return None
    first = seq_len - span
    blocks = block_tables[0, first // block_size : (seq_len - 1) // block_size + 1].tolist()
    if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
        return None
    return blocks[0] * block_size + first % block_size, span


def _first_visible(seq_len: int, q_len: int, window: int | None) -> int:
    """The earliest key position any query of a chunk (the last ``q_len`` of ``seq_len``) can see."""
    return 0 if window is None else max(0, seq_len - q_len - window + 1)


def _visible_keys(
    block_table: Tensor, seq_len: int, q_len: int, block_size: int, window: int | None
) -> tuple[Tensor, Tensor]:
    """Positions [L] and cache slots [L] of the keys any of a chunk's queries can see (none before the window)."""
    key_pos = torch.arange(_first_visible(seq_len, q_len, window), seq_len, device=block_table.device)  # [L]
    return key_pos, _slots(block_table[None], key_pos[None], block_size)[0]


@dataclass
class _PrefillPlan:
    """One sequence whose chunk has several queries: rows start:start+q_len of the batch."""

    start: int
    q_len: int
    slots: Tensor  # [L] cache slots of the keys any query of the chunk can see
    mask: Tensor | None  # [Q, L] causal (+ window) mask; None: the chunk is the whole visible context (is_causal)

    @staticmethod
    def build(
        start: int, q_len: int, block_table: Tensor, seq_len: int, block_size: int, window: int | None
    ) -> _PrefillPlan:
        # block_table [W]
        first_q = seq_len - q_len
        key_pos, slots = _visible_keys(block_table, seq_len, q_len, block_size, window)  # [L], [L]
        mask = None
        if not (first_q == 0 and (window is None or window >= seq_len)):
            query_pos = torch.arange(first_q, seq_len, device=block_table.device)[:, None]  # [Q, 1]
            mask = key_pos[None, :] <= query_pos  # [Q, L]
            if window is not None:
                mask &= key_pos[None, :] > query_pos - window
        return _PrefillPlan(start, q_len, slots, mask)


@dataclass(frozen=True)
class _Tiling:
    """When a sequence goes to the tiled path, and its tile sizes. ``key_tile`` None: never."""

    key_tile: int | None
    query_tile: int  # the portable (non-CPU) path's query piece
    decode_from: int  # decode rows with a visible span above this are tiled too
    cpu_flash: bool  # CPU tensors: the aten flash op per tile (False: the portable matmul path, as on CUDA)
    kernel_area: int  # a chunk of Q queries over L keys goes to the C kernel, where it runs, if Q * L <= this

    def tiles(self, span: int, q_len: int, seq_len: int) -> bool:
        if self.key_tile is None:
            return False
        if q_len == 1:
            return span > self.decode_from
        # A chunk that is its whole visible context runs as one is_causal SDPA; any other needs a
        # [Q, L] mask, which makes SDPA several times slower than the tiles even at L = 8K.
        return span > self.key_tile or not (q_len == span == seq_len)


@dataclass
class _StepPlan:
    """How one step's batch is attended, for one sliding window; identical for every layer."""

    decode: _DecodePlan | None  # the short query_len == 1 rows the kernel does not take, batched
    decode_rows: Tensor | None  # [B_dec] their rows in the batch; None when every row decodes this way
    prefill: list[_PrefillPlan]
    tiled: list[TiledPlan]  # long contexts, one plan per sequence
    paged: _PagedRows | None  # rows the C kernel takes, when it runs

    @staticmethod
    def build(meta: AttentionMetadata, window: int | None, tiling: _Tiling, kernel: bool) -> _StepPlan:
        q_lens, s_lens, bs = meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_size
        spans = [s - _first_visible(s, q, window) for q, s in zip(q_lens, s_lens)]  # keys each chunk sees
        long = [tiling.tiles(span, q, s) for span, q, s in zip(spans, q_lens, s_lens)]
        if meta.is_decode_only and not any(long) and not kernel:
            return _StepPlan(_DecodePlan.build(meta.block_tables, s_lens, bs, window), None, [], [], None)
        starts = [0, *accumulate(q_lens)]  # host copy of meta.query_start_loc: no device sync
        route = [
            "tiled" if lg else "kernel" if kernel and n * span <= tiling.kernel_area else "sdpa"
            for n, span, lg in zip(q_lens, spans, long)
        ]
        takes = [b for b, r in enumerate(route) if r == "kernel"]
        paged = _PagedRows.build(meta, takes, starts, window) if takes else None
        decode = [b for b, n in enumerate(q_lens) if n == 1 and route[b] == "sdpa"]
        dec_plan = rows = None
        if decode:
            dec_plan = _DecodePlan.build(meta.block_tables[decode], [s_lens[b] for b in decode], bs, window)
            rows = torch.tensor([starts[b] for b in decode], dtype=torch.long, device=meta.block_tables.device)
        prefill = [
            _PrefillPlan.build(starts[b], n, meta.block_tables[b], s_lens[b], bs, window)
            for b, n in enumerate(q_lens)
            if n > 1 and route[b] == "sdpa"
        ]
        tiled = [
            TiledPlan.build(
                starts[b],
                n,
                _visible_keys(meta.block_tables[b], s_lens[b], n, bs, window)[1],
                s_lens[b],
                window,
                tiling.key_tile,
            )
            for b, n in enumerate(q_lens)
            if route[b] == "tiled"
        ]
        return _StepPlan(dec_plan, rows, prefill, tiled, paged)


class CpuAttentionBackend(AttentionBackend):
    name = "cpu"

    def __init__(
        self,
        key_tile: int | None = 8192,
        query_tile: int = 512,
        decode_from: int = 16384,
        cpu_flash: bool = True,
        kernel: bool = True,
        kernel_area: int = 1 << 21,
    ):
        # key_tile: positions per key tile, and the visible span above which a prefill chunk is tiled;
        # measured on the tiny Mistral 4 (see docs/benchmarks.md, "Long contexts"). kernel_area: SDPA
        # overtakes the C kernel near 2048 queries over 2048 keys with SmolLM2's heads (docs/benchmarks.md).
        self.tiling = _Tiling(key_tile, query_tile, decode_from, cpu_flash, kernel_area)
        self.kernel = kernel  # rows on kernels.attention.decode where it runs and fits

    def write_kv(self, cache: Tensor, new: Tensor, slot_mapping: Tensor) -> None:
        # cache [NB, BS, *entry]; new [T, *entry]; slot_mapping [T]
        new = _as(new, cache.dtype)
        try:
            flat = cache.view(-1, *cache.shape[2:])  # [NB*BS, *entry], shares storage with cache
        except RuntimeError:  # strides don't allow merging NB and BS: 2-d advanced indexing (still one op)
            block_size = cache.shape[1]
            cache[slot_mapping // block_size, slot_mapping % block_size] = new
        else:
            flat.index_copy_(0, slot_mapping, new)

    def paged_attention(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> Tensor:
        # q [T, Hq, D]; k_cache [NB, BS, Hkv, D]; v_cache [NB, BS, Hkv, Dv] -> [T, Hq, Dv]
        assert q.shape[1] % k_cache.shape[2] == 0, (q.shape, k_cache.shape)
        return self._attend(q, k_cache, v_cache, v_cache.shape[-1], meta, scale, sliding_window)

    def _plan(self, meta: AttentionMetadata, window: int | None, kernel: bool = False) -> _StepPlan:
        # Built by the first layer of the step, reused by the others (the plan depends only on the batch).
        key = ("cpu_attention", window, self.tiling, kernel)
        return meta.derive(key, lambda: _StepPlan.build(meta, window, self.tiling, kernel))

    def _kernel_runs(self, q: Tensor, k_cache: Tensor, v_view: Tensor, meta: AttentionMetadata) -> bool:
        return (
            self.kernel
            and meta.block_tables.device.type == "cpu"
            and decode.fits(q, k_cache, v_view)
            and decode.library() is not None
        )

    def _attend(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor | None,
        v_dim: int,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
        skip_tiled: Callable[[TiledPlan], bool] | None = None,
    ) -> Tensor:
        """v_cache None means V is the first v_dim features of each K entry (MLA: the latent).
        Rows of tiled plans that ``skip_tiled`` picks are left for the caller (uninitialized here)."""
        if not meta.query_lens_cpu:
            return q.new_empty(0, q.shape[1], v_dim)
        v_view = k_cache[..., :v_dim] if v_cache is None else v_cache  # [NB, BS, Hkv, Dv]
        plan = self._plan(meta, window, self._kernel_runs(q, k_cache, v_view, meta))
        caches = (k_cache, v_cache, v_dim, scale)
        if plan.paged is not None and plan.paged.rows is None:  # the kernel takes every row
            return self._paged(q, plan.paged, k_cache, v_view, scale)
        if plan.decode is not None and plan.decode_rows is None:  # decode-only step
            return self._decode(q, plan.decode, *caches)

        out = q.new_empty(q.shape[0], q.shape[1], v_dim)  # [T, Hq, Dv]
        if plan.paged is not None:
            out[plan.paged.rows] = self._paged(q[plan.paged.rows], plan.paged, k_cache, v_view, scale)
        if plan.decode is not None:
            rows = plan.decode_rows
            out[rows] = self._decode(q[rows], plan.decode, *caches)
        for p in plan.prefill:
            out[p.start : p.start + p.q_len] = self._prefill(q[p.start : p.start + p.q_len], p, *caches)
        gather = partial(self._kv, k_cache, v_cache, v_dim, dtype=q.dtype)  # slots [nk] -> K, V tile
        for p in plan.tiled:
            if skip_tiled is None or not skip_tiled(p):
                out[p.rows] = self._tiled(q[p.rows], gather, v_dim, p, scale)
        return out

    def _tiled(self, q: Tensor, gather: Callable, v_dim: int, plan: TiledPlan, scale: float) -> Tensor:
        return attend_tiled(q, gather, v_dim, plan, scale, self.tiling.query_tile, self.tiling.cpu_flash)

    @staticmethod
    def _kv(k_cache: Tensor, v_cache: Tensor | None, v_dim: int, slots: Tensor, dtype: torch.dtype):
        """Gathered K [..., Hkv, D] and V [..., Hkv, Dv] at slots [...], in dtype."""
        return _read_kv(lambda cache: _gather(cache, slots), k_cache, v_cache, v_dim, dtype)

    @classmethod
    def _decode_kv(cls, plan: _DecodePlan, k_cache: Tensor, v_cache: Tensor | None, v_dim: int, dtype: torch.dtype):
        """K [B, L, Hkv, D] and V [B, L, Hkv, Dv] of the decode rows: views of the cache for a slot run."""
        if plan.run is None or not _flat_views(k_cache, v_cache):
            return cls._kv(k_cache, v_cache, v_dim, _run_slots(plan, k_cache.device), dtype)
        start, length = plan.run
        return _read_kv(
            lambda cache: cache.view(-1, *cache.shape[2:])[start : start + length][None], k_cache, v_cache, v_dim, dtype
        )

    @classmethod
    def _decode(
        cls, q: Tensor, plan: _DecodePlan, k_cache: Tensor, v_cache: Tensor | None, v_dim: int, scale: float
    ) -> Tensor:
        """One query per sequence, batched. q [B, Hq, D] -> [B, Hq, Dv]"""
        num_seqs, num_q_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        k, v = cls._decode_kv(plan, k_cache, v_cache, v_dim, q.dtype)  # [B, L, Hkv, D], [B, L, Hkv, Dv]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, L, D], [B, Hkv, L, Dv]
        # GQA: query head h = kv_head * G + g, so the G heads sharing a kv head become G query rows.
        qg = q.view(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.mask, scale=scale)  # [B, Hkv, G, Dv]
        return o.reshape(num_seqs, num_q_heads, v.shape[-1])

    @staticmethod
    def _paged(q: Tensor, rows: _PagedRows, k_cache: Tensor, v_view: Tensor, scale: float) -> Tensor:
        """Each row's query over its keys, on the C kernel. q [R, Hq, D] -> [R, Hq, Dv]"""
        return decode.paged_decode(q, k_cache, v_view, rows.tables, rows.first, rows.lens, scale)

    @classmethod
    def _prefill(
        cls, q: Tensor, plan: _PrefillPlan, k_cache: Tensor, v_cache: Tensor | None, v_dim: int, scale: float
    ) -> Tensor:
        """Queries are the last Q positions of one sequence. q [Q, Hq, D] -> [Q, Hq, Dv]"""
        k, v = cls._kv(k_cache, v_cache, v_dim, plan.slots, q.dtype)  # [L, Hkv, D], [L, Hkv, Dv]
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, L, D], [1, Hkv, L, Dv]
        qh = q.transpose(0, 1)[None]  # [1, Hq, Q, D]
        gqa = k.shape[1] != q.shape[1]
        if plan.mask is None:
            o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=plan.mask, scale=scale, enable_gqa=gqa)
        return o[0].transpose(0, 1)  # [Q, Hq, Dv]

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
        latent_dim = w_uk.shape[-1]
        # Absorb w_uk into the query: q_nope . (w_uk[h] c) == (q_nope @ w_uk[h]) . c
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk.to(q_nope.dtype)).transpose(0, 1)  # [T, H, L]
        q_full = torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1)  # [T, H, L + Dr]
        k_cache = latent_cache.unsqueeze(2)  # [NB, BS, 1, L + Dr]  (MQA: one shared "kv head"; V = its first L)
        expand = partial(_expansion_pays, latent_dim=latent_dim, nope_dim=w_uk.shape[1], v_dim=w_uv.shape[1])
        o_latent = self._attend(q_full, k_cache, None, latent_dim, meta, scale, None, expand)  # [T, H, L]
        # Absorb w_uv on the way out: V_h = c @ w_uv[h].T, so o_h = (p @ c) @ w_uv[h].T
        o = torch.bmm(o_latent.transpose(0, 1), w_uv.to(o_latent.dtype).transpose(1, 2)).transpose(0, 1)  # [T, H, Dv]
        if not meta.query_lens_cpu:
            return o
        gather = partial(_expanded_kv, latent_cache, w_uk, w_uv)
        kernel = self._kernel_runs(q_full, k_cache, k_cache[..., :latent_dim], meta)  # _attend's plan, not a second
        for p in filter(expand, self._plan(meta, None, kernel).tiled):
            q_heads = torch.cat([q_nope[p.rows], q_rope[p.rows].to(q_nope.dtype)], dim=-1)  # [Q, H, Dn + Dr]
            o[p.rows] = self._tiled(q_heads, gather, w_uv.shape[1], p, scale)
        return o


def _expansion_pays(plan: TiledPlan, latent_dim: int, nope_dim: int, v_dim: int) -> bool:
    """Whether a long MLA chunk is cheaper attended per head (keys expanded) than in latent space.

    Per query-key pair and head, the flash op (V padded to K's width) costs ~4 * D flops: D = L + Dr
    in latent space, Dn + Dr per head, so expanding saves 4 * (L - Dn) per pair and head; expanding a
    key costs 2 * L * (Dn + Dv) per head. Prefill chunks win (compute bound), decode rows do not.
    """
    return plan.q_len * 2 * (latent_dim - nope_dim) > latent_dim * (nope_dim + v_dim)


def _expanded_kv(latent_cache: Tensor, w_uk: Tensor, w_uv: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head K and V of the keys at slots [nk], from their cached latents.

    latent_cache [NB, BS, L + Dr]; w_uk [H, Dn, L]; w_uv [H, Dv, L] -> K [nk, H, Dn + Dr], V [nk, H, Dv]
    """
    num_heads, nope_dim, latent_dim = w_uk.shape
    rows = _gather(latent_cache, slots)  # [nk, L + Dr]
    latent, k_rope = rows[:, :latent_dim], rows[:, latent_dim:]  # [nk, L], [nk, Dr]
    k_nope = latent @ w_uk.to(latent.dtype).reshape(-1, latent_dim).T  # [nk, H * Dn]
    v = latent @ w_uv.to(latent.dtype).reshape(-1, latent_dim).T  # [nk, H * Dv]
    k_rope = k_rope[:, None, :].expand(-1, num_heads, -1)  # [nk, H, Dr]
    k = torch.cat([k_nope.view(-1, num_heads, nope_dim), k_rope], dim=-1)  # [nk, H, Dn + Dr]
    return k, v.view(-1, num_heads, w_uv.shape[1])


class CpuSdpaAttentionBackend(CpuAttentionBackend):
    """The CPU backend with its decode rows on gathered keys and PyTorch's SDPA, never the C kernel: the
    path before it, and the kernel's reference (``tests/kernels/test_attention_decode.py``)."""

    name = "cpu_sdpa"

    def __init__(self):
        super().__init__(kernel=False)


class CpuUntiledAttentionBackend(CpuAttentionBackend):
    """The CPU backend without the tiled path: one gather of the whole visible context per layer and
    sequence, and a ``[Q, L]`` mask for chunked prefill. Kept to measure against (``levante bench-long``)."""

    name = "cpu_untiled"

    def __init__(self):
        super().__init__(key_tile=None)
