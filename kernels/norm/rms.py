"""RMSNorm in C (``csrc/rms.c``) for float32 rows on AVX-512, with the residual add before it fused in.

PyTorch's CPU ``rms_norm`` is six ops, and a pre-norm decoder layer adds its attention's output to the
residual stream just before its second norm: on a decode step's few rows each op is mostly its dispatch.
``add_rms_norm`` does the add and the norm in one call. ``reference`` is the torch form both match up to
float32 summation order; where ``library()`` is None or ``fits`` says no, callers run it.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from kernels.compiled import CKernel, load

SOURCE = Path(__file__).with_name("csrc") / "rms.c"
CPU_FLAGS = ("avx512f", "avx512dq", "fma")
CC_FLAGS = ("-O3", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.levante_rms_norm.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.levante_rms_norm.restype = None
    return lib


KERNEL = CKernel("the C RMSNorm", SOURCE, CPU_FLAGS, CC_FLAGS, _declare, "PyTorch's rms_norm")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the reason logged once) where this machine cannot run it."""
    return load(KERNEL)


def fits(x: Tensor, weight: Tensor) -> bool:
    """float32 CPU rows whose last dim is contiguous, and a float32 CPU weight."""
    return (
        x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and x.is_contiguous()
        and library() is not None
    )


def reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., D] float32 -> weight * x / sqrt(mean(x^2) + eps)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _run(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor | None, Tensor]:
    dim = x.shape[-1]
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    residual = residual.contiguous() if residual is not None else None  # kept alive through the call
    weight = weight.contiguous()
    library().levante_rms_norm(
        x.data_ptr(), residual.data_ptr() if residual is not None else None,
        total.data_ptr() if total is not None else None, weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim,
        eps, torch.get_num_threads(),
    )  # fmt: skip
    return total, out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., D] -> its RMSNorm ([..., D]); ``fits(x, weight)``."""
    return _run(x, None, weight, eps)[1]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + residual, its RMSNorm), both [..., D]; ``fits(x, weight)`` and residual float32 of x's shape."""
    total, out = _run(x, residual, weight, eps)
    return total, out
