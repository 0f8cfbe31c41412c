"""CPU fused MoE.

float32 experts on AVX-512 run the C kernel over weight panels packed at load (``kernels.moe.panels``): the
whole layer in one call. Elsewhere tokens are grouped by expert, one gate_up and one down matmul per expert
hit: (token, slot) assignments are sorted by local expert id; assignments to other ranks' experts get the
sentinel id ``E_local`` and sort to the end. The inputs are gathered once in that order; the experts' outputs
are weighted and accumulated in float32 with one ``index_add_``, then cast back to ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.backend import ExpertWeights, MoEBackend
from kernels.linear.cpu import ONEDNN_BATCH_HINT, onednn_packs, packed_from_rows
from kernels.moe import panels


def _onednn_linear(x: Tensor, w: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # x [n, K] @ w [N, K].T -> [n, N]


def _packs(w: Tensor) -> bool:
    """Whether a layer's experts run oneDNN on packed copies: where this CPU's dense matmuls run oneDNN from
    one row (``kernels.linear.cpu.packed_from_rows``), an expert's few rows do too. On a 2-core AMD EPYC a
    tiny Mixtral's 8 layers of 8 experts (512 wide, 1024 inner) take 11.4 ms at 1 row and 12.4 at 4 packed,
    14.1 and 18.7 on the weights as they lie (docs/benchmarks.md), and F.linear is slower still."""
    return packed_from_rows() == 1 and onednn_packs(w)


class CpuMoEBackend(MoEBackend):
    name = "cpu"

    def prepare(self, w_gate_up: Tensor, w_down: Tensor) -> ExpertWeights:
        if panels.fits(w_gate_up, w_down) and panels.library() is not None:
            return ExpertWeights(w_gate_up, w_down, panels=panels.pack(w_gate_up, w_down))
        if not _packs(w_gate_up):
            return ExpertWeights(w_gate_up, w_down)
        pack = torch.ops.mkldnn._reorder_linear_weight
        packed = tuple(
            (pack(gu.contiguous(), ONEDNN_BATCH_HINT), pack(dn.contiguous(), ONEDNN_BATCH_HINT))
            for gu, dn in zip(w_gate_up, w_down)
        )  # per expert: [2I, D] and [D, I], blocked
        return ExpertWeights(w_gate_up, w_down, packed)

    def fused_moe(
        self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, experts: ExpertWeights, expert_start: int = 0
    ) -> Tensor:
        # x [T, D]; topk_ids [T, K]; topk_weights [T, K]
        if experts.panels is not None and x.dtype == torch.float32:
            return panels.fused_moe(x, topk_ids, topk_weights, experts.panels, expert_start)
        if x.shape[0] == 1:
            return _one_token(x, topk_ids, topk_weights, experts, expert_start)
        num_local, top_k = experts.gate_up.shape[0], topk_ids.shape[1]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
        local_ids = topk_ids.reshape(-1) - expert_start  # [T*K]
        is_local = (local_ids >= 0) & (local_ids < num_local)
        local_ids = torch.where(is_local, local_ids, num_local)  # foreign experts -> sentinel, sorted last
        order = torch.argsort(local_ids, stable=True)  # [T*K]
        counts = torch.bincount(local_ids, minlength=num_local + 1)[:num_local].tolist()
        token_of = order // top_k  # [T*K] token of each sorted assignment
        routed = x[token_of[: sum(counts)]]  # [A, D] the local assignments' inputs, grouped by expert
        ys, begin = [], 0
        for e, n in enumerate(counts):
            if n:
                ys.append(_expert(routed[begin : begin + n], experts, e))  # [n, D]
            begin += n
        if ys:
            weight_of = topk_weights.reshape(-1)[order[:begin]].float()  # [A]
            # one scatter for every expert: rows are added in expert order, as one index_add_ per expert would
            out.index_add_(0, token_of[:begin], torch.cat(ys).float() * weight_of[:, None])
        return out.to(x.dtype)


def _expert(x: Tensor, experts: ExpertWeights, e: int) -> Tensor:
    """Local expert e's SwiGLU MLP: x [n, D] -> [n, D]."""
    if experts.packed:
        linear, (w_gate_up, w_down) = _onednn_linear, experts.packed[e]
    else:
        linear, w_gate_up, w_down = F.linear, experts.gate_up[e], experts.down[e]
    gate, up = linear(x, w_gate_up).chunk(2, dim=-1)  # [n, I] each
    return linear(F.silu(gate) * up, w_down)


def _one_token(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, experts: ExpertWeights, start: int) -> Tensor:
    """One stream's decode step: its K experts in turn, without the sort and scatter a batch needs. The sum
    runs in the batch path's order (by local expert id) and in float32, as the batch path's does."""
    num_local = experts.gate_up.shape[0]
    chosen = sorted(zip((e - start for e in topk_ids[0].tolist()), topk_weights[0].float().tolist()))
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [1, D]
    for e, weight in chosen:
        if 0 <= e < num_local:
            out += _expert(x, experts, e).float() * weight
    return out.to(x.dtype)
