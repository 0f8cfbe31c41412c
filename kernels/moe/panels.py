"""Routed experts in C (``csrc/experts.c``) for a step's few rows per expert: float32 on AVX-512.

A decode step sends each expert a handful of rows, so its time is the experts' weights read from memory.
oneDNN multiplies one expert at a time, a Python call and a thread hand-off each; the kernel runs the
whole layer in one call, an expert per work item, each weight read once per 8 rows. Its weights lie in
16-output panels (``pack``); what it computes is the CPU backend's oneDNN path up to float32 summation
order. Where ``library()`` is None, or the shapes do not ``fit``, the CPU backend runs oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kernels.compiled import CKernel, load
from kernels.linear import panels as linear_panels
from kernels.linear.panels import PANEL

SOURCE = Path(__file__).with_name("csrc") / "experts.c"
CPU_FLAGS = ("avx512f", "fma")
CC_FLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.levante_moe_rows.argtypes = [p, i64, p, p, i64, i64, i64, p, p, i64, i64, p, ctypes.c_int]
    lib.levante_moe_rows.restype = ctypes.c_int
    return lib


KERNEL = CKernel("the C routed experts", SOURCE, CPU_FLAGS, CC_FLAGS, _declare, "oneDNN, one expert at a time")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the reason logged once) where this machine cannot run it."""
    return load(KERNEL)


@dataclass(frozen=True)
class Panels:
    gate_up: Tensor  # [E, 2I/16, D, 16]: output o of expert e is panel o // 16, lane o % 16
    down: Tensor  # [E, D/16, I, 16]


def fits(w_gate_up: Tensor, w_down: Tensor) -> bool:
    """float32 CPU experts whose hidden and inner sizes are whole panels."""
    hidden, inter = w_down.shape[1], w_down.shape[2]
    return (
        w_gate_up.dtype == w_down.dtype == torch.float32
        and w_gate_up.device.type == "cpu"
        and hidden % PANEL == 0
        and inter % PANEL == 0
    )


def pack(w_gate_up: Tensor, w_down: Tensor) -> Panels:
    """w_gate_up [E, 2I, D], w_down [E, D, I] -> the kernel's panels, the dense linears' layout per expert."""
    return Panels(linear_panels.pack(w_gate_up), linear_panels.pack(w_down))


def fused_moe(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, panels: Panels, expert_start: int) -> Tensor:
    """x [T, D] float32; topk_ids [T, K] global ids; topk_weights [T, K] -> [T, D] float32: the sum over each
    token's local experts (``expert_start`` .. + E) of weight * SwiGLU expert."""
    num_local, _, hidden, _ = panels.gate_up.shape
    inter = panels.down.shape[2]
    x = x.contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    out = torch.empty(x.shape[0], hidden, dtype=torch.float32, device=x.device)
    rc = library().levante_moe_rows(
        x.data_ptr(), x.shape[0], ids.data_ptr(), weights.data_ptr(), ids.shape[1], expert_start, num_local,
        panels.gate_up.data_ptr(), panels.down.data_ptr(), hidden, inter, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError(f"the routed experts could not allocate their scratch for {x.shape[0]} tokens")
    return out
