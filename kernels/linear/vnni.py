"""Weight-only int4 and int8 linears on AVX-512 VNNI (``csrc/vnni.c``), for a decode step's few rows.

The input is rounded to int8 per 32 values (scale: the group's largest magnitude / 127, as llama.cpp's Q8
activations), so one ``vpdpbusd`` multiplies 64 weight codes by 64 input codes. What the kernel computes is
``F.linear(round_input(x), dequantize(weight))`` up to float32 summation order: ``reference`` below.

The C file is built and loaded by ``kernels.compiled``; where the CPU lacks the instructions, or the compiler
fails, ``library()`` is None with the reason logged once, and the linears run PyTorch's kernels instead.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.compiled import CKernel, load
from kernels.linear.formats import INT4_GROUP, QuantizedWeight, dequantize

SOURCE = Path(__file__).with_name("csrc") / "vnni.c"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma")
CC_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-fopenmp")
PAIR = 2 * INT4_GROUP  # inputs in one 512-bit register: two groups
ROW_BLOCK = 4  # weight rows the kernel takes at a time
_lane = torch.arange(PAIR) // 4
# Register byte b holds input (b // 8) * 4 + b % 4 of group (b // 4) % 2: lane l is 4 inputs of group l % 2
PAIR_ORDER = (_lane % 2) * INT4_GROUP + (_lane // 2) * 4 + torch.arange(PAIR) % 4  # [64]


@dataclass(frozen=True)
class VnniWeight:
    scheme: str  # "int4" | "int8"
    codes: Tensor  # uint8, pair order; int4 [N, K / 2] (two codes a byte) | int8 [N, K] (code + 128)
    scale: Tensor  # bfloat16; int4 [N, K / 32] | int8 [N]
    zero: Tensor | None  # bfloat16, int4 [N, K / 32]: w = (code - 8) * scale + zero


def fits(shape: tuple[int, int]) -> bool:
    n, k = shape
    return n % ROW_BLOCK == 0 and k % PAIR == 0


def pack(qw: QuantizedWeight) -> VnniWeight:
    """The kernel's layout of a quantized weight (``fits`` its shape)."""
    n, k = qw.shape
    if qw.scheme == "int8":
        codes = (qw.q.to(torch.int16) + 128).to(torch.uint8).view(n, k // PAIR, PAIR)[..., PAIR_ORDER]
        return VnniWeight("int8", codes.reshape(n, k).contiguous(), qw.scale.contiguous(), None)
    codes = qw.q.view(n, k // PAIR, PAIR)[..., PAIR_ORDER]  # [N, K/64, 64]
    half = PAIR // 2
    packed = codes[..., :half] | (codes[..., half:] << 4)  # [N, K/64, 32]
    return VnniWeight("int4", packed.reshape(n, k // 2).contiguous(), qw.scale.contiguous(), qw.zero.contiguous())


def round_input(x: Tensor) -> Tensor:
    """x: [M, K] float32 -> the values its int8 codes stand for (per 32: largest magnitude / 127)."""
    groups = x.view(x.shape[0], -1, INT4_GROUP)  # [M, K/32, 32]
    amax = groups.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(groups * inv) * (amax / 127.0)).view_as(x)


def reference(x: Tensor, qw: QuantizedWeight, bias: Tensor | None) -> Tensor:
    """What ``linear`` computes, in plain torch: x [M, K] float32 -> [M, N]."""
    return F.linear(round_input(x), dequantize(qw), bias)


def linear(x: Tensor, w: VnniWeight, bias: Tensor | None) -> Tensor:
    """x: [M, K] -> [M, N] float32 (+ bias)."""
    lib = library()
    x = x.float().contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    m, k = x.shape
    n = w.codes.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    ptr = bias.data_ptr() if bias is not None else None
    threads = torch.get_num_threads()
    if w.scheme == "int4":
        rc = lib.levante_int4_linear(x.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), w.zero.data_ptr(),
                                     ptr, y.data_ptr(), m, n, k, threads)  # fmt: skip
    else:
        rc = lib.levante_int8_linear(x.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), ptr, y.data_ptr(),
                                     m, n, k, threads)  # fmt: skip
    if rc != 0:
        raise MemoryError(f"the VNNI linear could not allocate its {m}x{k} input codes")
    return y


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.levante_int4_linear.argtypes = [p, p, p, p, p, p, i64, i64, i64, ctypes.c_int]
    lib.levante_int8_linear.argtypes = [p, p, p, p, p, i64, i64, i64, ctypes.c_int]
    lib.levante_int4_linear.restype = lib.levante_int8_linear.restype = ctypes.c_int
    return lib


KERNEL = CKernel("int8-activation VNNI linears", SOURCE, CPU_FLAGS, CC_FLAGS, _declare, "PyTorch's weight-only kernels")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (the reason logged once) where this machine cannot run them."""
    return load(KERNEL)
