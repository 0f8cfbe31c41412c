"""What the runner sees of a model: the ``CausalLM`` interface and its KV cache spec.

A model computes a flattened varlen batch (``T`` tokens of several sequences,
described by :class:`kernels.metadata.AttentionMetadata`) against a paged KV
cache that the model allocates itself, because only the model knows what an
entry holds: full keys and values per kv head (``"gqa"``), or one compressed
latent plus a shared rotated key per token (``"mla"``, Mistral 4).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernels.metadata import AttentionMetadata


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the paged cache: ``num_layers`` layers, each a tuple of ``[NB, BS, *entry]`` tensors.

    kind="gqa": ``entry_shapes == ((Hkv, D), (Hkv, Dv))`` -- keys, values.
    kind="mla": ``entry_shapes == ((L + Dr,),)`` -- normalized latent then rotated rope key.
    """

    kind: str
    num_layers: int
    entry_shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    sliding_window: int | None = None  # every layer attends this window: older blocks can be dropped

    def __post_init__(self) -> None:
        if self.kind not in ("gqa", "mla"):
            raise ValueError(f"kind: must be 'gqa' or 'mla', got {self.kind!r}")
        expected = 2 if self.kind == "gqa" else 1
        if len(self.entry_shapes) != expected:
            raise ValueError(f"entry_shapes: {self.kind} needs {expected} entries, got {self.entry_shapes}")

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies, summed over layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * sum(math.prod(shape) for shape in self.entry_shapes) * elem

    def bytes_per_block(self, block_size: int) -> int:
        """Cache bytes of one block (``block_size`` token slots in every layer)."""
        return block_size * self.bytes_per_token()

    def allocate(
        self, num_blocks: int, block_size: int, device: torch.device | str = "cpu"
    ) -> list[tuple[Tensor, ...]]:
        """Zeroed per-layer caches: a tuple of ``[num_blocks, block_size, *entry]`` tensors per layer."""
        return [
            tuple(
                torch.zeros(num_blocks, block_size, *shape, dtype=self.dtype, device=device)
                for shape in self.entry_shapes
            )
            for _ in range(self.num_layers)
        ]


class CausalLM(nn.Module, ABC):
    """A decoder-only LM over a paged KV cache.

    ``forward`` returns final-normed hidden states; ``compute_logits`` turns
    the rows the caller needs into float32 logits (so a step computes the
    vocabulary projection only for sampled rows).
    """

    @abstractmethod
    def kv_cache_spec(self) -> KVCacheSpec:
        """Entry shapes and dtype of this model's paged cache."""

    @property
    def device(self) -> torch.device:
        """Where the weights live; the KV cache and every step tensor go there too."""
        return next(self.parameters()).device

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[Tensor, ...]]:
        """Per-layer zeroed caches for ``num_blocks`` blocks of ``block_size`` slots, on the model's device."""
        return self.kv_cache_spec().allocate(num_blocks, block_size, self.device)

    @abstractmethod
    def forward(
        self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, kv_caches: list[tuple[Tensor, ...]]
    ) -> Tensor:
        """input_ids [T] int64, positions [T] int64 -> final-normed hidden [T, D].

        Writes this step's cache entries at ``meta.slot_mapping`` in every layer.
        """

    @abstractmethod
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, D] -> logits [N, V] float32."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the parameters; raises ModelLoadError on
        a missing, unexpected or mis-shaped tensor."""

    # Expert parallelism; a model without routed experts has nothing to split.

    def set_moe_combine(self, combine: Callable[[Tensor], Tensor]) -> None:
        """Install the cross-rank reduction applied to each MoE layer's partial routed output."""

    def num_local_expert_params(self) -> int:
        """Routed-expert parameters this rank holds."""
        return 0

    def expert_load(self) -> tuple[int, ...]:
        """Token-to-expert assignments per expert-parallel rank since load; () without routed experts."""
        return ()

    def num_expert_params(self) -> int:
        """Routed-expert parameters of the whole model."""
        return 0

    def is_weight_needed(self, name: str) -> bool:
        """False for a checkpoint tensor this model would skip anyway (e.g. another
        expert-parallel rank's experts), so a loader may avoid reading it."""
        return True
