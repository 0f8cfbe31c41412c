"""Levante kernels: paged attention (dense/GQA/sliding window/MLA) and fused MoE backends."""

from kernels.backend import AttentionBackend, MoEBackend, get_attention_backend, get_moe_backend
from kernels.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "MoEBackend", "get_attention_backend", "get_moe_backend"]
