"""The decoder-only skeleton every model here shares: embeddings, a stack of
:class:`~engine.native.models.layers.DecoderLayer`, final norm, LM head, and loading
of Hugging Face-named weights (including routed experts in any layout, sliced
to this expert-parallel rank).

A concrete model supplies its parsed config, its attention and MLP per layer
(``make_layer``), its rotary embedding and its KV cache spec. Parameter names
mirror the Hugging Face ones (``model.layers.3.self_attn.q_proj.weight``), so
most tensors load by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from engine.checkpoint.files import ModelLoadError
from engine.config import ParallelConfig
from engine.native.models.base import CausalLM, KVCacheSpec
from engine.native.models.layers import (
    QUANTIZE_INT8,
    DecoderLayer,
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    RoutedExperts,
    RoutedMoE,
    StepContext,
)
from kernels.backend import AttentionBackend, MoEBackend
from kernels.metadata import AttentionMetadata

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported (choices: {sorted(_DTYPES)})") from None


def hf_get(hf: dict, key: str, default: Any) -> Any:
    """``hf[key]`` if present (an explicit null stays None, as in transformers), else ``default``."""
    return hf.get(key, default)


_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(.+)")
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


class _Backbone(nn.Module):
    """Holds ``embed_tokens``, ``layers`` and ``norm`` under the Hugging Face prefix ``model.``."""

    def __init__(self, embed_tokens: Embedding, layers: list[DecoderLayer], norm: RMSNorm):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class DecoderLM(CausalLM):
    """Shared decoder-only model. Subclasses set ``self.cfg`` fields used here:
    vocab_size, hidden_size, num_layers, rms_norm_eps, tie_word_embeddings."""

    def __init__(
        self,
        hf_config: dict,
        *,
        dtype: str | torch.dtype = "float32",
        attention_backend: AttentionBackend,
        moe_backend: MoEBackend | None = None,
        parallel: ParallelConfig = ParallelConfig(),
    ):
        super().__init__()
        self.hf_config = hf_config
        self.dtype = resolve_dtype(dtype)
        self.attention_backend = attention_backend
        self.moe_backend = moe_backend
        self.parallel = parallel
        self.cfg = self.parse_config(hf_config)
        self.rotary = self.make_rotary()
        cfg = self.cfg
        embed = Embedding(cfg.vocab_size, cfg.hidden_size, self.dtype)
        layers = [self.make_layer(i) for i in range(cfg.num_layers)]
        self.model = _Backbone(embed, layers, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, self.dtype)
        self.lm_head.quantize_as = QUANTIZE_INT8  # as GGUF files ship it: the logits move least
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ----------------------------------------------------------------- hooks for subclasses

    def parse_config(self, hf: dict) -> Any:
        raise NotImplementedError

    def make_rotary(self) -> RotaryEmbedding:
        raise NotImplementedError

    def make_layer(self, layer_idx: int) -> DecoderLayer:
        raise NotImplementedError

    def step_context(self, positions: Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> StepContext:
        cos, sin = self.rotary.cos_sin(positions, dtype)
        return StepContext(meta=meta, positions=positions, cos=cos, sin=sin)

    def checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name to this model's parameter name (None: skip it)."""
        if _IGNORED.fullmatch(name):
            return None
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return None  # tied: the head is the embedding (as transformers ties it)
        return name

    def require_moe_backend(self) -> MoEBackend:
        if self.moe_backend is None:
            raise ValueError(f"{type(self).__name__} has MoE layers and needs a moe_backend")
        return self.moe_backend

    # ----------------------------------------------------------------- CausalLM

    def kv_cache_spec(self) -> KVCacheSpec:
        raise NotImplementedError

    def forward(
        self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, kv_caches: list[tuple[Tensor, ...]]
    ) -> Tensor:
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"got {len(kv_caches)} layer caches for {len(self.model.layers)} layers")
        h = self.model.embed_tokens(input_ids)  # [T, hidden]
        ctx = self.step_context(positions, meta, h.dtype)
        for layer, cache in zip(self.model.layers, kv_caches):
            h = layer(h, ctx, cache)
        return self.model.norm(h)  # [T, hidden]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()  # [N, V]

    # ----------------------------------------------------------------- expert parallelism

    def moe_layers(self) -> list[RoutedMoE]:
        return [m for m in self.modules() if isinstance(m, RoutedMoE)]

    def set_moe_combine(self, combine: Callable[[Tensor], Tensor]) -> None:
        """Install the cross-rank reduction (e.g. an all-reduce sum) on every MoE layer."""
        for moe in self.moe_layers():
            moe.combine = combine

    def expert_load(self) -> tuple[int, ...]:
        """Token-to-expert assignments per expert-parallel rank, summed over MoE layers since load."""
        layers = self._moe_layer_list()
        if not layers:
            return ()
        return tuple(torch.stack([m.rank_load for m in layers]).sum(0).tolist())

    def _moe_layer_list(self) -> list[RoutedMoE]:
        if getattr(self, "_moe_layers", None) is None:  # the module tree is fixed after __init__
            self._moe_layers = self.moe_layers()
        return self._moe_layers

    def num_local_expert_params(self) -> int:
        """Routed-expert parameters this rank holds (1/ep_size of the model's)."""
        return sum(p.numel() for m in self.modules() if isinstance(m, RoutedExperts) for p in m.parameters())

    def num_expert_params(self) -> int:
        """Routed-expert parameters of the whole model (all ranks together)."""
        return sum(
            p.numel() // m.num_local_experts * m.num_experts
            for m in self.modules()
            if isinstance(m, RoutedExperts)
            for p in m.parameters()
        )

    # ----------------------------------------------------------------- loading

    def _expert_modules(self) -> dict[str, RoutedExperts]:
        if getattr(self, "_experts_by_prefix", None) is None:  # the module tree is fixed after __init__
            self._experts_by_prefix = {name: m for name, m in self.named_modules() if isinstance(m, RoutedExperts)}
        return self._experts_by_prefix

    def is_weight_needed(self, name: str) -> bool:
        mapped = self.checkpoint_name(name)
        if mapped is None:
            return False
        m = _EXPERTS.fullmatch(mapped)
        if m is not None:
            experts = self._expert_modules().get(m.group(1))
            return experts is None or experts.wants(m.group(2))
        return True

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        experts = self._expert_modules()
        params = {
            name: p
            for name, p in self.named_parameters()
            if not any(name.startswith(prefix + ".") for prefix in experts)
        }
        loaded: set[str] = set()
        with torch.no_grad():
            for raw_name, tensor in weights:
                name = self.checkpoint_name(raw_name)
                if name is None:
                    continue
                m = _EXPERTS.fullmatch(name)
                if m is not None and m.group(1) in experts:
                    experts[m.group(1)].load(m.group(2), tensor, raw_name)
                    continue
                param = params.get(name)
                if param is None:
                    raise ModelLoadError(
                        f"unexpected tensor {raw_name!r} in checkpoint ({type(self).__name__} has no such parameter)"
                    )
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ModelLoadError(
                        f"tensor {raw_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                    )
                param.copy_(tensor)
                loaded.add(name)
        missing = [name for name in params if name not in loaded]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelLoadError(f"tensor {missing[0]!r} is missing from the checkpoint{more}")
        for prefix, module in experts.items():
            gaps = module.missing()
            if gaps:
                more = f" (and {len(gaps) - 1} more)" if len(gaps) > 1 else ""
                raise ModelLoadError(
                    f"routed expert weights of {prefix!r} are missing from the checkpoint: {gaps[0]}{more}"
                )
