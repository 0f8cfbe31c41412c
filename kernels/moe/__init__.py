"""Fused MoE backends (``reference``, ``cpu``) and the router functions in ``routing``."""

from kernels.moe.cpu import CpuMoEBackend
from kernels.moe.reference import ReferenceMoEBackend
from kernels.moe.routing import route_grouped_topk, route_softmax_topk

__all__ = ["CpuMoEBackend", "ReferenceMoEBackend", "route_grouped_topk", "route_softmax_topk"]
