"""Mistral 4 (Mistral Small 4): multi-head latent attention + DeepSeek-style MoE.

* Attention (MLA): queries through an optional low-rank ``q_a -> norm -> q_b``;
  keys/values are compressed per token into a latent ``c`` (``kv_lora_rank``)
  plus one shared rotary key ``k_rope``. The paged cache holds only
  ``[normalized c ; rotated k_rope]`` per token; ``kv_b_proj`` is applied to the
  latent inside the MLA kernel (w_uk / w_uv), never materialized in the cache.
* RoPE: YaRN (frequencies, cos/sin magnitude and the ``mscale_all_dim``
  softmax-scale correction as transformers), optionally interleaved pairs,
  on the ``qk_rope_head_dim`` part only; queries are then scaled by the llama-4
  factor ``1 + beta * ln(1 + floor(pos / original_max_position_embeddings))``.
* MLP: the first ``first_k_dense_replace`` layers are dense; the rest route
  with group-limited top-k (softmax, ``n_group`` groups scored by their two
  best experts, best ``topk_group`` groups compete) and add a shared expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.native.models.base import KVCacheSpec
from engine.native.models.decoder import DecoderLM, hf_get
from engine.native.models.layers import (
    QUANTIZE_NONE,
    DecoderLayer,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    RoutedMoE,
    StepContext,
    check_activation,
    llama4_query_scale,
    standardize_rope_parameters,
    yarn_get_mscale,
)
from kernels.backend import AttentionBackend
from kernels.metadata import AttentionMetadata
from kernels.moe.routing import route_grouped_topk

# Mistral4Config's rope_parameters when a config.json has none.
_DEFAULT_ROPE = {
    "type": "yarn",
    "rope_theta": 10000.0,
    "factor": 128.0,
    "original_max_position_embeddings": 8192,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale_all_dim": 1.0,
    "mscale": 1.0,
    "llama_4_scaling_beta": 0.1,
}


@dataclass(frozen=True)
class Mistral4Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict
    rope_interleave: bool
    attention_bias: bool

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLAAttention(nn.Module):
    """Multi-head latent attention over a latent-only paged cache ``[NB, BS, L + Dr]``."""

    # transformers builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps
    LATENT_NORM_EPS = 1e-6

    def __init__(self, cfg: Mistral4Config, rotary: RotaryEmbedding, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent_dim = cfg.kv_lora_rank
        self.rotary = rotary
        self.backend = backend
        h, bias = cfg.hidden_size, cfg.attention_bias
        q_out = cfg.num_heads * cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, bias, dtype)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, self.LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out, False, dtype)
            self.q_proj = None
        else:
            self.q_proj = Linear(h, q_out, False, dtype)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias, dtype)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, self.LATENT_NORM_EPS, dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), False, dtype)
        self.kv_b_proj.quantize_as = QUANTIZE_NONE  # absorbed into attention: its weight is read as is
        self.o_proj = Linear(cfg.num_heads * cfg.v_head_dim, h, bias, dtype)
        scale = cfg.qk_head_dim**-0.5
        if cfg.rope["rope_type"] != "default" and cfg.rope.get("mscale_all_dim"):
            mscale = yarn_get_mscale(cfg.rope["factor"], cfg.rope["mscale_all_dim"])
            scale = scale * mscale * mscale
        self.scale = scale

    def forward(self, h: Tensor, ctx: StepContext, kv_cache: tuple[Tensor]) -> Tensor:  # [T, hidden]
        (latent_cache,) = kv_cache  # [NB, BS, L + Dr]
        n = h.shape[0]
        if self.q_proj is None:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h)))
        else:
            q = self.q_proj(h)
        q = q.view(n, self.num_heads, self.nope_dim + self.rope_dim)  # [T, H, Dn + Dr]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)  # [T, H, Dn], [T, H, Dr]

        compressed = self.kv_a_proj_with_mqa(h)  # [T, L + Dr]
        latent, k_rope = compressed.split([self.latent_dim, self.rope_dim], dim=-1)  # [T, L], [T, Dr]
        latent = self.kv_a_layernorm(latent)  # [T, L]

        q_rope = self.rotary.apply(q_rope, ctx.cos, ctx.sin)  # [T, H, Dr]
        k_rope = self.rotary.apply(k_rope[:, None, :], ctx.cos, ctx.sin)[:, 0]  # [T, Dr]
        self.backend.write_kv(latent_cache, torch.cat([latent, k_rope], dim=-1), ctx.meta.slot_mapping)

        if ctx.query_scale is not None:  # llama-4 position scaling of the whole query
            q_nope = q_nope * ctx.query_scale
            q_rope = q_rope * ctx.query_scale

        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        w_uk, w_uv = w_kv[:, : self.nope_dim], w_kv[:, self.nope_dim :]  # [H, Dn, L], [H, Dv, L]
        out = self.backend.mla_paged_attention(
            q_nope, q_rope, latent_cache, ctx.meta, w_uk, w_uv, self.scale
        )  # [T, H, Dv]
        return self.o_proj(out.reshape(n, self.num_heads * self.v_dim))  # [T, hidden]


class Mistral4MoE(RoutedMoE):
    """Group-limited routed experts + one shared expert (see RoutedMoE for the EP combine order)."""

    def __init__(self, cfg: Mistral4Config, dtype: torch.dtype, moe_backend, parallel):
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts if cfg.n_shared_experts else None
        super().__init__(
            cfg.hidden_size,
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.moe_intermediate_size,
            dtype,
            moe_backend,
            parallel,
            shared_intermediate=shared,
        )
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def route(self, router_logits: Tensor) -> tuple[Tensor, Tensor]:
        return route_grouped_topk(
            router_logits, self.top_k, self.n_group, self.topk_group, self.norm_topk_prob, self.routed_scaling_factor
        )  # [T, K] each


class Mistral4ForCausalLM(DecoderLM):
    def parse_config(self, hf: dict) -> Mistral4Config:
        check_activation(hf_get(hf, "hidden_act", "silu"))
        nope, rope_dim = hf_get(hf, "qk_nope_head_dim", 64), hf_get(hf, "qk_rope_head_dim", 64)
        heads = hf_get(hf, "num_attention_heads", 32)
        kv_heads = hf_get(hf, "num_key_value_heads", 32) or heads
        if kv_heads != heads:
            raise ValueError(
                f"Mistral 4 needs num_key_value_heads == num_attention_heads (MLA expands the latent "
                f"to every head), got {kv_heads} and {heads}"
            )
        rope_hf = dict(hf)
        if hf.get("rope_parameters") is None and hf.get("rope_scaling") is None:
            rope_hf["rope_parameters"] = dict(
                _DEFAULT_ROPE, max_position_embeddings=hf_get(hf, "max_position_embeddings", 1048576)
            )
        rope = standardize_rope_parameters(rope_hf)
        rope.setdefault("partial_rotary_factor", rope_dim / (nope + rope_dim))
        if rope.get("llama_4_scaling_beta") is not None and not rope.get("original_max_position_embeddings"):
            raise ValueError("rope_parameters.llama_4_scaling_beta needs original_max_position_embeddings")
        num_experts = hf.get("n_routed_experts", hf.get("num_local_experts", 128))
        n_group = hf_get(hf, "n_group", 1) or 1
        topk_group = hf_get(hf, "topk_group", 1) or n_group
        top_k = hf_get(hf, "num_experts_per_tok", 4)
        if num_experts % n_group != 0 or num_experts // n_group < 2 or topk_group > n_group:
            raise ValueError(
                f"group-limited routing needs n_routed_experts ({num_experts}) divisible by n_group "
                f"({n_group}) with >= 2 experts per group and topk_group ({topk_group}) <= n_group"
            )
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"num_experts_per_tok={top_k} exceeds the experts of topk_group={topk_group} groups")
        return Mistral4Config(
            vocab_size=hf_get(hf, "vocab_size", 131072),
            hidden_size=hf_get(hf, "hidden_size", 4096),
            intermediate_size=hf_get(hf, "intermediate_size", 12288),
            moe_intermediate_size=hf_get(hf, "moe_intermediate_size", 2048),
            num_layers=hf_get(hf, "num_hidden_layers", 36),
            num_heads=heads,
            q_lora_rank=hf_get(hf, "q_lora_rank", 1024),
            kv_lora_rank=hf_get(hf, "kv_lora_rank", 256),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope_dim,
            v_head_dim=hf_get(hf, "v_head_dim", 128),
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            n_shared_experts=hf_get(hf, "n_shared_experts", 1) or 0,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=bool(hf_get(hf, "norm_topk_prob", True)),
            routed_scaling_factor=float(hf_get(hf, "routed_scaling_factor", 1.0)),
            first_k_dense_replace=hf_get(hf, "first_k_dense_replace", 0) or 0,
            rms_norm_eps=hf_get(hf, "rms_norm_eps", 1e-6),
            max_position_embeddings=hf_get(hf, "max_position_embeddings", 1048576),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", False)),
            rope=rope,
            rope_interleave=bool(hf_get(hf, "rope_interleave", True)),
            attention_bias=bool(hf_get(hf, "attention_bias", False)),
        )

    def make_rotary(self) -> RotaryEmbedding:
        cfg = self.cfg
        # transformers derives the rotary dim as int(head_dim * partial_rotary_factor) with head_dim = Dn + Dr
        rotary = RotaryEmbedding(
            cfg.rope,
            cfg.qk_head_dim,
            cfg.max_position_embeddings,
            interleaved=cfg.rope_interleave,
            default_dim=cfg.qk_rope_head_dim,
        )
        if rotary.rotary_dim != cfg.qk_rope_head_dim:
            raise ValueError(
                f"rope parameters give a rotary dim of {rotary.rotary_dim}, but qk_rope_head_dim is "
                f"{cfg.qk_rope_head_dim} (check partial_rotary_factor)"
            )
        return rotary

    def make_layer(self, layer_idx: int) -> DecoderLayer:
        cfg = self.cfg
        attn = MLAAttention(cfg, self.rotary, self.attention_backend, self.dtype)
        if layer_idx >= cfg.first_k_dense_replace:
            mlp = Mistral4MoE(cfg, self.dtype, self.require_moe_backend(), self.parallel)
        else:
            mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, False, self.dtype)
        return DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, self.dtype)

    def step_context(self, positions: Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> StepContext:
        ctx = super().step_context(positions, meta, dtype)
        beta = self.cfg.rope.get("llama_4_scaling_beta")
        if beta is not None:
            scale = llama4_query_scale(positions, beta, self.cfg.rope["original_max_position_embeddings"])
            ctx.query_scale = scale.to(dtype)[:, None, None]  # [T, 1, 1]
        return ctx

    def kv_cache_spec(self) -> KVCacheSpec:
        entry = (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,)
        return KVCacheSpec(kind="mla", num_layers=self.cfg.num_layers, entry_shapes=(entry,), dtype=self.dtype)
