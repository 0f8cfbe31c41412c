"""Paged attention backends: ``reference`` (the spec) and ``cpu`` (what the engine runs)."""

from kernels.attention.cpu import CpuAttentionBackend
from kernels.attention.reference import ReferenceAttentionBackend

__all__ = ["CpuAttentionBackend", "ReferenceAttentionBackend"]
