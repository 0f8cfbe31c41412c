"""Reference fused MoE: the spec. Token by token, expert by expert, float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.backend import ExpertWeights, MoEBackend


def expert_mlp(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """One SwiGLU expert. x: [..., D]; w_gate_up: [2*I, D]; w_down: [D, I] -> [..., D]"""
    gate, up = (x @ w_gate_up.T).chunk(2, dim=-1)  # [..., I] each
    return (F.silu(gate) * up) @ w_down.T


class ReferenceMoEBackend(MoEBackend):
    name = "reference"

    def fused_moe(
        self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, experts: ExpertWeights, expert_start: int = 0
    ) -> Tensor:
        # x [T, D]; topk_ids [T, K]; topk_weights [T, K]
        w_gate_up, w_down = experts.gate_up, experts.down  # [E_local, 2*I, D], [E_local, D, I]
        num_local = w_gate_up.shape[0]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
        for t in range(x.shape[0]):
            for k in range(topk_ids.shape[1]):
                e = int(topk_ids[t, k]) - expert_start
                if not 0 <= e < num_local:
                    continue  # another rank's expert
                y = expert_mlp(x[t].float(), w_gate_up[e].float(), w_down[e].float())  # [D]
                out[t] += float(topk_weights[t, k]) * y
        return out.to(x.dtype)
