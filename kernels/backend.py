"""Kernel backends: three small abstract interfaces and one factory each.

Every backend has a plain-torch *reference* implementation (the spec, slow and
readable, in ``kernels/*/reference.py``) and faster implementations that are
tested against it (``kernels/*/cpu.py``). Both are plain torch ops that make
their index tensors on the device of the tensors they are given, so a CUDA
engine runs the same backends (SDPA dispatches to its CUDA kernels).

Shape conventions used throughout (comments, not code):
    T   tokens in the flattened step batch       B   sequences
    Hq  query heads      Hkv  key/value heads    D / Dv  key / value head dim
    NB  cache blocks     BS   block size (tokens per block)
    E   experts          K    experts per token  I  expert intermediate size
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from kernels.metadata import AttentionMetadata

if TYPE_CHECKING:
    from kernels.moe.panels import Panels


class AttentionBackend(ABC):
    """Paged attention over a block-structured KV cache."""

    name: str

    @abstractmethod
    def write_kv(self, cache: Tensor, new: Tensor, slot_mapping: Tensor) -> None:
        """Store this step's entries in the cache, in place.

        cache: [NB, BS, *entry]   new: [T, *entry]   slot_mapping: [T] int64
        Row ``t`` of ``new`` goes to block ``slot // BS``, offset ``slot % BS``.
        """

    @abstractmethod
    def paged_attention(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> Tensor:
        """Causal (optionally sliding-window) attention for a varlen batch.

        q: [T, Hq, D]; k_cache: [NB, BS, Hkv, D]; v_cache: [NB, BS, Hkv, Dv] -> [T, Hq, Dv].
        GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
        A query at absolute position ``p`` sees keys at positions ``k`` with
        ``k <= p`` and, with a window ``W``, ``k > p - W`` (i.e. the last W
        tokens including itself -- transformers' ``sliding_window_overlay``).
        """

    @abstractmethod
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
        """Multi-head latent attention (DeepSeek-V2 / Mistral 4) over a latent-only cache.

        q_nope: [T, H, Dn]; q_rope: [T, H, Dr] (already rotated);
        latent_cache: [NB, BS, L + Dr] (first L: normalized latent c, last Dr: rotated k_rope);
        w_uk: [H, Dn, L]; w_uv: [H, Dv, L] -> [T, H, Dv].
        Per head: K_h = [c @ w_uk[h].T ; k_rope], V_h = c @ w_uv[h].T,
        scores = (q_nope . K_nope + q_rope . k_rope) * scale, causal.
        """


@dataclass(frozen=True)
class ExpertWeights:
    """A layer's routed experts (this rank's slice) as a MoE backend runs them: ``MoEBackend.prepare``."""

    gate_up: Tensor  # [E_local, 2*I, D] (gate rows first, then up rows)
    down: Tensor  # [E_local, D, I]
    packed: tuple[tuple[Tensor, Tensor], ...] | None = None  # per expert (gate_up, down) in oneDNN's layout
    panels: Panels | None = None  # every expert in the C kernel's layout (kernels.moe.panels)


class MoEBackend(ABC):
    """Routed expert MLPs (SwiGLU) with expert-parallel slicing."""

    name: str

    def prepare(self, w_gate_up: Tensor, w_down: Tensor) -> ExpertWeights:
        """A layer's experts in this backend's form, made once at load; by default as they lie.

        w_gate_up: [E_local, 2*I, D] (gate rows first, then up rows); w_down: [E_local, D, I].
        """
        return ExpertWeights(w_gate_up, w_down)

    @abstractmethod
    def fused_moe(
        self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, experts: ExpertWeights, expert_start: int = 0
    ) -> Tensor:
        """sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) over this rank's experts.

        x: [T, D]; topk_ids: [T, K] int64 global expert ids; topk_weights: [T, K];
        experts: ``prepare`` d weights of global experts ``expert_start <= e < expert_start + E_local``.
        The rest belong to other ranks. Returns [T, D] in x.dtype.
        """


class LinearKernel(ABC):
    """A linear whose weight the kernel holds in its own form: a dense float weight, or a weight-only
    quantized one (``kernels.linear.formats``)."""

    name: str

    @abstractmethod
    def prepare(self, weight: Any) -> Any:
        """The kernel's own form of a [N, K] weight (a ``Tensor`` or a ``QuantizedWeight``), made once at load."""

    @abstractmethod
    def linear(self, x: Tensor, prepared: Any, bias: Tensor | None) -> Tensor:
        """x: [..., K] -> [..., N] in x.dtype: ``x @ weight.T (+ bias)``, a quantized weight dequantized."""

    def silu_and_mul(self, x: Tensor, prepared: Any, bias: Tensor | None) -> Tensor:
        """A SwiGLU's gate and up as one [2I, K] weight: x [..., K] -> silu(gate) * up, [..., I]. By default
        ``linear`` and then the two ops; a kernel may fold them into its matmul."""
        gate, up = self.linear(x, prepared, bias).chunk(2, dim=-1)  # [..., I] each
        return F.silu(gate) * up


def _attention_backends() -> dict[str, type[AttentionBackend]]:
    from kernels.attention.cpu import CpuAttentionBackend, CpuSdpaAttentionBackend, CpuUntiledAttentionBackend
    from kernels.attention.reference import ReferenceAttentionBackend

    return {
        "reference": ReferenceAttentionBackend,
        "cpu": CpuAttentionBackend,
        "cpu_untiled": CpuUntiledAttentionBackend,
        "cpu_sdpa": CpuSdpaAttentionBackend,
    }


def _moe_backends() -> dict[str, type[MoEBackend]]:
    from kernels.moe.cpu import CpuMoEBackend
    from kernels.moe.reference import ReferenceMoEBackend

    return {"reference": ReferenceMoEBackend, "cpu": CpuMoEBackend}


def _linear_kernels() -> dict[str, type[LinearKernel]]:
    from kernels.linear.cpu import CpuLinearKernel, CpuWeightOnlyLinearKernel
    from kernels.linear.reference import ReferenceLinearKernel

    return {"reference": ReferenceLinearKernel, "cpu": CpuLinearKernel, "cpu_weight_only": CpuWeightOnlyLinearKernel}


def _pick(kind: str, choices: dict, name: str):
    try:
        cls = choices[name]
    except KeyError:
        raise ValueError(f"unknown {kind} backend {name!r}; choices: {sorted(choices)}") from None
    return cls()


def get_attention_backend(name: str = "cpu") -> AttentionBackend:
    """``"reference"`` (the spec), ``"cpu"`` (what the engine runs, on CPU or CUDA tensors), ``"cpu_untiled"``
    (``"cpu"`` without its long-context tiles) or ``"cpu_sdpa"`` (``"cpu"`` without its C decode kernel): the
    last two are the paths before those, to measure against."""
    return _pick("attention", _attention_backends(), name)


def get_moe_backend(name: str = "cpu") -> MoEBackend:
    """``"reference"`` (the spec) or ``"cpu"`` (what the engine runs, on CPU or CUDA tensors)."""
    return _pick("moe", _moe_backends(), name)


def get_linear_kernel(name: str = "cpu") -> LinearKernel:
    """``"reference"`` (``F.linear``; quantized: dequantize, then a plain matmul: the spec), ``"cpu"`` (dense float32
    weights packed for oneDNN; quantized ones on the int8-activation VNNI kernel where the CPU has it, else
    PyTorch's CPU int8/int4 kernels; elsewhere ``F.linear``) or ``"cpu_weight_only"`` (``"cpu"`` without the VNNI
    kernel)."""
    return _pick("linear", _linear_kernels(), name)


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "ExpertWeights",
    "LinearKernel",
    "MoEBackend",
    "get_attention_backend",
    "get_linear_kernel",
    "get_moe_backend",
]
