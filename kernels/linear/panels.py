"""float32 linears in C (``csrc/panels.c``) over weights laid out in 16-output panels, on AVX-512.

oneDNN's matmul of a decode step's few rows reads the weights at well under this machine's memory speed
(``benchmarks/linears.py``); the kernel multiplies each weight, loaded once, by up to 8 rows' broadcast
inputs, and takes a prefill's rows 256 at a time so that its panels are reused from cache. What it computes
is ``F.linear`` up to float32 summation order. Where ``library()`` is None, or the shape does not ``fit``,
dense linears run oneDNN or ``F.linear`` (``kernels.linear.cpu``).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from kernels.compiled import CKernel, load

SOURCE = Path(__file__).with_name("csrc") / "panels.c"
CPU_FLAGS = ("avx512f", "fma")
CC_FLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp")
PANEL = 16  # outputs a panel interleaves: one 512-bit register of float32


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.levante_panel_linear.argtypes = [p, i64, i64, p, i64, p, p, ctypes.c_int]
    lib.levante_panel_linear.restype = None
    lib.levante_panel_gated.argtypes = [p, i64, i64, p, i64, p, p, ctypes.c_int]
    lib.levante_panel_gated.restype = None
    return lib


KERNEL = CKernel("the C float32 linears", SOURCE, CPU_FLAGS, CC_FLAGS, _declare, "oneDNN or F.linear")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the reason logged once) where this machine cannot run it."""
    return load(KERNEL)


def fits(weight: Tensor) -> bool:
    """A float32 CPU weight [N, K] whose sizes are whole panels."""
    return (
        weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[0] % PANEL == 0
        and weight.shape[1] % PANEL == 0
    )


def pack(weight: Tensor) -> Tensor:
    """weight [..., N, K] -> [..., N/16, K, 16]: output n is panel n // 16, lane n % 16."""
    *lead, n, k = weight.shape
    return weight.reshape(*lead, n // PANEL, PANEL, k).transpose(-1, -2).contiguous()


def linear(x: Tensor, panels: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] float32 -> [..., N] float32 (+ bias)."""
    return _run(library().levante_panel_linear, x, panels, bias, panels.shape[0] * PANEL)


def gated(x: Tensor, panels: Tensor, bias: Tensor | None) -> Tensor:
    """A SwiGLU's [gate; up] weight in panels (an even number of them): x [..., K] float32 -> silu(gate) * up,
    [..., N / 2] float32."""
    return _run(library().levante_panel_gated, x, panels, bias, panels.shape[0] * PANEL // 2)


def _run(fn: Callable[..., None], x: Tensor, panels: Tensor, bias: Tensor | None, n: int) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x.device)
    bias = bias.float().contiguous() if bias is not None else None  # kept alive through the call
    fn(
        x2.data_ptr(), x2.shape[0], x2.shape[1], panels.data_ptr(), n, bias.data_ptr() if bias is not None else None,
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)
