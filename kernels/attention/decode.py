"""Paged attention in C (``csrc/decode.c``), one query row at a time: float32 on AVX-512, reading K and V from
the cache blocks in place, where the torch path gathers them into new tensors first and then runs SDPA. The
CPU backend gives it decode rows and the rows of short prompts (each row sees the keys up to its position).

Each (sequence, kv head) is a work item: its query heads score the visible keys, softmax in float32
(the row's maximum subtracted), and sum the value rows. The reference is the CPU backend's gather + SDPA
path (``CpuSdpaAttentionBackend``), which runs wherever ``library()`` is None or ``fits`` says no.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from kernels.compiled import CKernel, load

SOURCE = Path(__file__).with_name("csrc") / "decode.c"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")
CC_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.levante_paged_decode.argtypes = [p, i64, i64, p, p, i64, i64, i64, i64, p, i64, i64, p, p, p]
    lib.levante_paged_decode.argtypes += [i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.levante_paged_decode.restype = ctypes.c_int
    return lib


KERNEL = CKernel("the C decode attention", SOURCE, CPU_FLAGS, CC_FLAGS, _declare, "gathered keys and PyTorch's SDPA")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the reason logged once) where this machine cannot run it."""
    return load(KERNEL)


def _rows_of_one(cache: Tensor) -> bool:
    """cache [NB, BS, H, D]: float32 on the CPU, slots evenly apart, each head's features contiguous."""
    return (
        cache.device.type == "cpu"
        and cache.dtype == torch.float32
        and cache.stride(-1) == 1
        and cache.stride(0) == cache.shape[1] * cache.stride(1)
    )


def fits(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether the kernel takes these: float32 CPU tensors whose last dims are contiguous."""
    return q.dtype == torch.float32 and q.stride(-1) == 1 and _rows_of_one(k_cache) and _rows_of_one(v_cache)


def paged_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, first: Tensor, lens: Tensor, scale: float
) -> Tensor:
    """One query per sequence over its keys ``first[b] <= pos < lens[b]``, found through ``tables``.

    q [B, Hq, D]; k_cache [NB, BS, Hkv, D]; v_cache [NB, BS, Hkv, Dv] (V may be a view of K's first Dv
    features); tables [B, W], first [B], lens [B] int64 on the CPU -> [B, Hq, Dv]
    """
    lib = library()
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, v_dim = k_cache.shape[2], v_cache.shape[-1]
    out = torch.empty(num_seqs, num_q_heads, v_dim, dtype=torch.float32, device=q.device)
    rc = lib.levante_paged_decode(
        q.data_ptr(), q.stride(0), q.stride(1),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1),
        v_cache.stride(2), tables.data_ptr(), tables.shape[1], k_cache.shape[1], first.data_ptr(), lens.data_ptr(),
        out.data_ptr(), num_seqs, num_q_heads, num_kv_heads, head_dim, v_dim, scale, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError(f"the decode attention could not allocate its scores for {num_seqs} sequences")
    return out
