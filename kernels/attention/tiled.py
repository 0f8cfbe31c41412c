"""Tiled paged attention for long contexts: the cache is read one key tile at a time, each tile's
partial result carries its log-sum-exp, and partials are merged online (flash-style).

Nothing is sized by the context: no ``[Q, L]`` mask and no gather of the whole visible context.
Per layer the working set is one key tile (``key_tile`` positions gathered from the cache), the
chunk's queries and its float32 accumulators (``[Hq, Q, Dv]`` and ``[Hq, Q]``).

Key tiles are runs of ``key_tile`` positions aligned to the chunk's first query ``a0``: the chunk's
own keys ``[a0, s)`` are tiled forward from ``a0``, earlier keys backward from it, so for every tile
``[k0, k1)`` a query ``p`` falls in one of four classes (``W`` the window, infinite without one):

* ``p < k0`` or ``p >= k1 + W - 1``: sees nothing in the tile; not computed.
* ``k0 <= p < k1`` and ``p < k0 + W``: sees ``k0..p``, a top-left causal square (``is_causal``,
  because ``k0`` is the tile's first query: tiles with ``k0 >= a0`` start at a query).
* ``k1 <= p < k0 + W``: sees the whole tile; no mask at all (most of the work at long context).
* the rest, ``k0 + W <= p < k1 + W - 1``: cut by the window; an additive bias of at most
  ``key_tile - 1`` rows by ``key_tile`` keys, and every such row sees at least one key (so no row's
  log-sum-exp is empty).

Keys before ``a0 - W + 1`` are never gathered, so blocks wholly before the window may be the null
block (freed by the scheduler, garbage or NaN inside) without effect.

On CPU each tile op is one ``aten._scaled_dot_product_flash_attention_for_cpu`` call, which returns
(out, logsumexp) and tiles the query axis itself. That op is CPU-only: on other devices (CUDA) the
portable path computes the same (out, lse) with plain matmuls over query pieces of ``query_tile``
rows, so its score buffer is ``[Hq, query_tile, key_tile]``.

Measured (2 shared cores, one MLA layer of the tiny Mistral 4, a 2048-query chunk at the end of a
64K context, ms per layer): one gather + ``[Q, L]``-masked SDPA (``cpu_untiled``) 3448; flash op
with key tiles of 2048 / 8192 / 32768 positions 628 / 615 / 642; portable matmul path 10817 (key
tile 2048). The flash op runs at ~65-70 GFLOP/s whether K is expanded (stride 0) or the heads are
folded into the query axis, so MQA/GQA simply expand K and V. Hence: flash op on CPU, key tile 8192.
MLA: a first per-head variant (each key tile expanded through kv_b_proj) measured slower than the
absorbed latent form (2805 vs 1669 ms per layer); expanding a key tile with one matmul per weight
(``cpu._expanded_kv``) is cheap, and attending per head over 24 features instead of 40 took the
whole 64K prefill from 32.6 s to 23.6 s, so long prefill chunks go per head (``cpu._expansion_pays``)
and decode rows stay in latent space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
from torch import Tensor


@dataclass
class _TileOp:
    """Queries ``q0:q1`` (rows of the chunk) against key tile positions ``k0:k1`` (offsets into the slots)."""

    q0: int
    q1: int
    kind: str  # "full" | "causal" (top-left) | "bias"
    bias: Tensor | None = None  # [q1-q0, k1-k0] float additive (0 / -inf); only for kind == "bias"


@dataclass
class _KeyTile:
    k0: int  # offsets into the plan's slots (position - first key position)
    k1: int
    ops: list[_TileOp]


@dataclass
class TiledPlan:
    """One sequence's chunk (rows ``start:start+q_len`` of the batch) attended tile by tile."""

    start: int
    q_len: int
    slots: Tensor  # [L] cache slots of the visible keys, in position order (L = visible span)
    tiles: list[_KeyTile] = field(default_factory=list)

    @property
    def rows(self) -> slice:
        """This sequence's rows of the step's batch."""
        return slice(self.start, self.start + self.q_len)

    @staticmethod
    def build(start: int, q_len: int, slots: Tensor, seq_len: int, window: int | None, key_tile: int) -> TiledPlan:
        """slots: [L] slots of positions ``seq_len - L .. seq_len - 1`` (the earliest key any query sees)."""
        first_key = seq_len - slots.shape[0]
        a0 = seq_len - q_len  # position of the chunk's first query
        w = window if window is not None else seq_len + 1  # "no window" == a window nothing reaches past
        bounds = list(range(a0, seq_len, key_tile)) + [seq_len]  # own keys, forward from a0
        bounds = list(range(a0 - key_tile, first_key, -key_tile))[::-1] + bounds  # earlier keys, backward
        bounds = [first_key] + bounds if bounds[0] != first_key else bounds
        plan = TiledPlan(start, q_len, slots)
        biases: dict[tuple[int, int, int], Tensor] = {}  # identical band patterns are shared
        for k0, k1 in pairwise(bounds):
            ops = _ops_for_tile(k0, k1, a0, seq_len, w, slots.device, biases)
            if ops:
                plan.tiles.append(_KeyTile(k0 - first_key, k1 - first_key, ops))
        return plan


def _ops_for_tile(k0: int, k1: int, a0: int, s: int, w: int, device: torch.device, biases: dict) -> list[_TileOp]:
    """The query ranges (positions -> chunk rows) that see key positions [k0, k1), by class."""
    ops = []
    lo, hi = max(a0, k0), min(s, k1, k0 + w)
    if lo < hi:  # top-left causal square: only tiles of the chunk's own keys, where k0 is a query
        assert lo == k0, (k0, a0)
        ops.append(_TileOp(lo - a0, hi - a0, "causal"))
    lo, hi = max(a0, k1), min(s, k0 + w)
    if lo < hi:
        ops.append(_TileOp(lo - a0, hi - a0, "full"))
    lo, hi = max(a0, k0 + w), min(s, k1 + w - 1)
    if lo < hi:
        key = (lo - k0, hi - lo, k1 - k0)
        if key not in biases:
            q = torch.arange(lo, hi, device=device)[:, None]  # [nq, 1]
            k = torch.arange(k0, k1, device=device)[None, :]  # [1, nk]
            seen = (k <= q) & (k > q - w)  # [nq, nk]
            biases[key] = torch.zeros(seen.shape, device=device).masked_fill_(~seen, float("-inf"))
        ops.append(_TileOp(lo - a0, hi - a0, "bias", biases[key]))
    return ops


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, op: _TileOp, scale: float) -> tuple[Tensor, Tensor]:
    """q [1, H, nq, D]; k [1, H, nk, D]; v [1, H, nk, Dv] -> out [1, H, nq, Dv], lse [1, H, nq] float32."""
    bias = None if op.bias is None else op.bias.to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, op.kind == "causal", attn_mask=bias, scale=scale
    )
    return out, lse.float()


def _portable(q: Tensor, k: Tensor, v: Tensor, op: _TileOp, scale: float, query_tile: int) -> tuple[Tensor, Tensor]:
    """Same contract as _flash_cpu with plain matmuls, query_tile rows at a time (CUDA and any device)."""
    outs, lses = [], []
    nk = k.shape[2]
    kf, vf = k.float(), v.float()
    for r0 in range(0, q.shape[2], query_tile):
        qp = q[:, :, r0 : r0 + query_tile].float()  # [1, H, nq', D]
        scores = torch.matmul(qp, kf.transpose(-1, -2)) * scale  # [1, H, nq', nk]
        if op.kind == "causal":
            rows = torch.arange(r0, r0 + qp.shape[2], device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(nk, device=q.device)[None, :] > rows, float("-inf"))
        elif op.kind == "bias":
            scores = scores + op.bias[r0 : r0 + qp.shape[2]]
        lse = torch.logsumexp(scores, dim=-1)  # [1, H, nq']
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), vf))  # [1, H, nq', Dv]
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def _same_width(k: Tensor, v: Tensor) -> Tensor:
    """V [nk, Hkv, Dv] widened to K's D: K itself when V is its first Dv columns (MLA), else zero-padded."""
    if v.shape[-1] == k.shape[-1]:
        return v
    if v.data_ptr() == k.data_ptr() and v.stride() == k.stride():
        return k
    assert v.shape[-1] < k.shape[-1], "a V wider than K needs zero columns in Q and K instead"
    return torch.nn.functional.pad(v, (0, k.shape[-1] - v.shape[-1]))


def _per_query_head(x: Tensor, num_heads: int) -> Tensor:
    """[nk, Hkv, D] -> [1, Hq, nk, D]: query head h reads kv head h // (Hq // Hkv).

    MQA (MLA's one latent "head") is a stride-0 expand; GQA copies the tile once per group member."""
    x = x.transpose(0, 1)[None]  # [1, Hkv, nk, D]
    if x.shape[1] == num_heads:
        return x
    if x.shape[1] == 1:
        return x.expand(1, num_heads, *x.shape[2:])
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def _merge(acc: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Fold one partial (out [H, n, Dv], lse [H, n]) into the accumulators (same shapes, float32), in place."""
    new = torch.logaddexp(acc_lse, lse)  # [H, n]
    acc.mul_(torch.exp(acc_lse - new)[..., None]).add_(out.float() * torch.exp(lse - new)[..., None])
    acc_lse.copy_(new)


def attend_tiled(
    q: Tensor,
    gather: Callable[[Tensor], tuple[Tensor, Tensor]],
    v_dim: int,
    plan: TiledPlan,
    scale: float,
    query_tile: int,
    flash: bool,
) -> Tensor:
    """q [Q, Hq, D]; gather(slots [nk]) -> K [nk, Hkv, D], V [nk, Hkv, Dv] in q's dtype -> [Q, Hq, Dv]."""
    num_q, num_heads, _ = q.shape
    qh = q.transpose(0, 1)[None]  # [1, Hq, Q, D]
    acc = q.new_zeros(num_heads, num_q, v_dim, dtype=torch.float32)  # [Hq, Q, Dv]
    acc_lse = q.new_full((num_heads, num_q), -math.inf, dtype=torch.float32)  # [Hq, Q]
    fast = flash and q.device.type == "cpu"  # the flash op is CPU-only
    for tile in plan.tiles:
        k, v = gather(plan.slots[tile.k0 : tile.k1])  # [nk, Hkv, D], [nk, Hkv, Dv]
        if fast:
            v = _same_width(k, v)  # [nk, Hkv, D]: the flash op wants V as wide as K; extra columns dropped below
        k, v = _per_query_head(k, num_heads), _per_query_head(v, num_heads)  # [1, Hq, nk, D], [1, Hq, nk, Dv]
        for op in tile.ops:
            qs = qh[:, :, op.q0 : op.q1]  # [1, Hq, nq, D]
            if fast:
                out, lse = _flash_cpu(qs, k, v, op, scale)
            else:
                out, lse = _portable(qs, k, v, op, scale, query_tile)
            _merge(acc[:, op.q0 : op.q1], acc_lse[:, op.q0 : op.q1], out[0, ..., :v_dim], lse[0])
    return acc.transpose(0, 1).to(q.dtype)  # [Q, Hq, Dv]
