"""Mixtral: the Mistral decoder with every MLP replaced by a top-k softmax-routed MoE.

Routing as ``MixtralTopKRouter``: softmax over all experts in float32, top-k,
renormalize. Checkpoints name the MoE block ``block_sparse_moe`` (what
transformers' ``save_pretrained`` writes, with per-expert ``w1/w2/w3``) or
``mlp`` (transformers' in-memory names, fused ``gate_up_proj``/``down_proj``);
both load, as do per-expert ``gate_proj/up_proj/down_proj``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from engine.native.models.decoder import hf_get
from engine.native.models.layers import RoutedMoE
from engine.native.models.mistral import MistralForCausalLM
from kernels.moe.routing import route_softmax_topk


class MixtralMoE(RoutedMoE):
    def route(self, router_logits: Tensor) -> tuple[Tensor, Tensor]:
        return route_softmax_topk(router_logits, self.top_k, renormalize=True)  # [T, K] each


class MixtralForCausalLM(MistralForCausalLM):
    family = "mixtral"
    defaults: ClassVar[dict] = dict(MistralForCausalLM.defaults, rms_norm_eps=1e-5, sliding_window=None)

    def parse_moe_config(self, hf: dict) -> dict:
        num_experts = hf_get(hf, "num_local_experts", 8)
        top_k = hf_get(hf, "num_experts_per_tok", 2)
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in [1, num_local_experts={num_experts}]")
        return dict(num_experts=num_experts, num_experts_per_tok=top_k)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        cfg = self.cfg
        return MixtralMoE(
            cfg.hidden_size,
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.intermediate_size,
            self.dtype,
            self.require_moe_backend(),
            self.parallel,
        )

    def checkpoint_name(self, name: str) -> str | None:
        name = super().checkpoint_name(name)
        return None if name is None else name.replace(".block_sparse_moe.", ".mlp.")
