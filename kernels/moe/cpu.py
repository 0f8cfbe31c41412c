"""CPU fused MoE: tokens grouped by expert, one gate_up and one down matmul per expert hit.

(token, slot) assignments are sorted by local expert id; assignments to
other ranks' experts get the sentinel id ``E_local`` and sort to the end.
Outputs are weighted and accumulated in float32 with ``index_add_``, then
cast back to ``x.dtype``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.backend import MoEBackend
from kernels.linear.cpu import onednn_packs, packed_from_rows


def _onednn_linear(x: Tensor, w: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # x [n, K] @ w [N, K].T -> [n, N]


def _expert_linear(w: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The matmul for a layer's experts (``w`` one of their weights, all alike), chosen once per call. Where
    this CPU's dense matmuls run oneDNN from one row (``kernels.linear.cpu.packed_from_rows``), an expert's
    few rows do too, on the weight as it lies: on a 2-core AMD EPYC a tiny Mixtral layer's 8 experts take
    1.2 vs 3.0 ms at 1 row, 2.0 vs 8.8 at 4 (F.linear)."""
    return _onednn_linear if packed_from_rows() == 1 and onednn_packs(w) else F.linear


class CpuMoEBackend(MoEBackend):
    name = "cpu"

    def fused_moe(
        self,
        x: Tensor,
        topk_ids: Tensor,
        topk_weights: Tensor,
        w_gate_up: Tensor,
        w_down: Tensor,
        expert_start: int = 0,
    ) -> Tensor:
        # x [T, D]; topk_ids [T, K]; topk_weights [T, K]; w_gate_up [E_local, 2*I, D]; w_down [E_local, D, I]
        num_local, top_k = w_gate_up.shape[0], topk_ids.shape[1]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
        local_ids = topk_ids.reshape(-1) - expert_start  # [T*K]
        is_local = (local_ids >= 0) & (local_ids < num_local)
        local_ids = torch.where(is_local, local_ids, num_local)  # foreign experts -> sentinel, sorted last
        order = torch.argsort(local_ids, stable=True)  # [T*K]
        counts = torch.bincount(local_ids, minlength=num_local + 1)[:num_local].tolist()
        token_of = order // top_k  # [T*K] token of each sorted assignment
        weight_of = topk_weights.reshape(-1)[order].float()  # [T*K]
        linear = _expert_linear(w_gate_up)
        begin = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tokens = token_of[begin : begin + n]  # [n]
            gate, up = linear(x[tokens], w_gate_up[e]).chunk(2, dim=-1)  # [n, I] each
            y = linear(F.silu(gate) * up, w_down[e])  # [n, D]
            out.index_add_(0, tokens, y.float() * weight_of[begin : begin + n, None])
            begin += n
        return out.to(x.dtype)
