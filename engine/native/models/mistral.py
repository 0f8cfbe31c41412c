"""Mistral (and Llama) dense decoder with grouped-query attention over a paged KV cache.

Differences between the two families handled here:

* Mistral honours ``sliding_window`` (MistralConfig's default is 4096 when the
  key is absent; ``null`` disables it): a query at position p sees keys
  ``p - W < k <= p``, exactly transformers' ``sliding_window_overlay`` mask.
  Llama ignores any ``sliding_window`` key, like ``LlamaModel``.
* Llama has ``attention_bias`` / ``mlp_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from engine.native.models.base import KVCacheSpec
from engine.native.models.decoder import DecoderLM, hf_get
from engine.native.models.layers import (
    DecoderLayer,
    GatedMLP,
    Linear,
    RotaryEmbedding,
    StepContext,
    check_activation,
    fuse_linears,
    standardize_rope_parameters,
)
from kernels.backend import AttentionBackend


@dataclass(frozen=True)
class MistralConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict
    sliding_window: int | None
    attention_bias: bool = False
    mlp_bias: bool = False
    # Mixtral only
    num_experts: int = 0
    num_experts_per_tok: int = 0


class GQAAttention(nn.Module):
    """Multi-head attention with ``num_kv_heads`` shared key/value heads, paged cache."""

    def __init__(self, cfg: MistralConfig, rotary: RotaryEmbedding, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.rotary = rotary
        self.backend = backend
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias, dtype)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias, dtype)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias, dtype)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias, dtype)
        # q, k and v in one matmul; the *_proj parameters stay loadable by name (views of these).
        self.qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)  # [(Hq+2Hkv)*D, hidden]

    def forward(self, h: Tensor, ctx: StepContext, kv_cache: tuple[Tensor, Tensor]) -> Tensor:  # [T, hidden]
        k_cache, v_cache = kv_cache  # [NB, BS, Hkv, D] each
        n, hq, hkv = h.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv(h).view(n, hq + 2 * hkv, self.head_dim)  # [T, Hq+2Hkv, D]
        # q and k heads side by side get the same per-position rotation: one elementwise pass for both.
        qk = self.rotary.apply(qkv[:, : hq + hkv], ctx.cos, ctx.sin)  # [T, Hq+Hkv, D]
        q, k = qk[:, :hq], qk[:, hq:]  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, hq + hkv :]  # [T, Hkv, D]
        self.backend.write_kv(k_cache, k, ctx.meta.slot_mapping)
        self.backend.write_kv(v_cache, v, ctx.meta.slot_mapping)
        out = self.backend.paged_attention(
            q, k_cache, v_cache, ctx.meta, self.scale, sliding_window=self.sliding_window
        )  # [T, Hq, D]
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))  # [T, hidden]


class MistralForCausalLM(DecoderLM):
    """``MistralForCausalLM`` checkpoints (and, via the subclass below, ``LlamaForCausalLM``)."""

    family = "mistral"
    honours_sliding_window = True  # LlamaModel ignores the key; MistralModel / MixtralModel mask with it
    # transformers' config-class defaults for keys a config.json may omit
    defaults: ClassVar[dict] = dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096 * 32,
        tie_word_embeddings=False,
        sliding_window=4096,
        hidden_act="silu",
    )

    def parse_config(self, hf: dict) -> MistralConfig:
        d = self.defaults
        check_activation(hf_get(hf, "hidden_act", d["hidden_act"]))
        hidden = hf_get(hf, "hidden_size", d["hidden_size"])
        heads = hf_get(hf, "num_attention_heads", d["num_attention_heads"])
        kv_heads = hf_get(hf, "num_key_value_heads", d["num_key_value_heads"]) or heads
        head_dim = hf.get("head_dim") or hidden // heads
        if heads % kv_heads != 0:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        sliding_window = hf_get(hf, "sliding_window", d["sliding_window"]) if self.honours_sliding_window else None
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window={sliding_window} must be positive or null")
        cfg = MistralConfig(
            vocab_size=hf_get(hf, "vocab_size", d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=hf_get(hf, "intermediate_size", d["intermediate_size"]),
            num_layers=hf_get(hf, "num_hidden_layers", d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_get(hf, "rms_norm_eps", d["rms_norm_eps"]),
            max_position_embeddings=hf_get(hf, "max_position_embeddings", d["max_position_embeddings"]),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", d["tie_word_embeddings"])),
            rope=standardize_rope_parameters(hf),
            sliding_window=sliding_window,
            attention_bias=bool(hf.get("attention_bias", False)) if self.family == "llama" else False,
            mlp_bias=bool(hf.get("mlp_bias", False)) if self.family == "llama" else False,
            **self.parse_moe_config(hf),
        )
        return cfg

    def parse_moe_config(self, hf: dict) -> dict:
        return {}

    def make_rotary(self) -> RotaryEmbedding:
        rotary = RotaryEmbedding(self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings)
        if rotary.rotary_dim != self.cfg.head_dim:
            raise ValueError(
                f"partial rotary embeddings (rotary dim {rotary.rotary_dim} < head_dim "
                f"{self.cfg.head_dim}) are not supported for {type(self).__name__}"
            )
        return rotary

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return GatedMLP(self.cfg.hidden_size, self.cfg.intermediate_size, self.cfg.mlp_bias, self.dtype)

    def make_layer(self, layer_idx: int) -> DecoderLayer:
        attn = GQAAttention(self.cfg, self.rotary, self.attention_backend, self.dtype)
        return DecoderLayer(attn, self.make_mlp(layer_idx), self.cfg.hidden_size, self.cfg.rms_norm_eps, self.dtype)

    def kv_cache_spec(self) -> KVCacheSpec:
        entry = (self.cfg.num_kv_heads, self.cfg.head_dim)
        return KVCacheSpec(
            kind="gqa",
            num_layers=self.cfg.num_layers,
            entry_shapes=(entry, entry),
            dtype=self.dtype,
            sliding_window=self.cfg.sliding_window,
        )


class LlamaForCausalLM(MistralForCausalLM):
    """Llama checkpoints run on the Mistral code: no sliding window, optional biases."""

    family = "llama"
    honours_sliding_window = False
    defaults: ClassVar[dict] = dict(
        MistralForCausalLM.defaults,
        intermediate_size=11008,
        num_key_value_heads=None,
        max_position_embeddings=2048,
        sliding_window=None,
    )
