"""Linears on PyTorch's CPU kernels, and our C ones.

- Dense float32 whose sizes are whole 16-output panels, on AVX-512: the weight is also laid out once, at load,
  in panels for the C kernel (``kernels.linear.panels``), which runs every row count: no oneDNN copy then.
- Other dense float32 (and bfloat16 where the CPU has AVX-512 BF16): the weight is also reordered once, at load,
  into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``), which matmuls of ``packed_from_rows()``
  rows or more read as it lies (``mkldnn._linear_pointwise``). On an Intel CPU fewer rows (one stream's
  decode) run ``F.linear`` on the weight as loaded: MKL's matrix-vector product reads it at memory bandwidth
  there, and oneDNN's is slower; on an AMD CPU MKL's is the slower one, and oneDNN runs from one row.
  Other devices and a build without oneDNN run ``F.linear`` only.
- Quantized: ``_weight_int8pack_mm`` (int8 weights, one scale per row) and ``_weight_int4pack_mm_for_cpu``
  (int4 weights packed two to a byte, a scale and a zero per group). Both read bfloat16 activations (their
  vectorized path) and accumulate in float32; the weights are read at a quarter or an eighth of fp32's bytes.
  Their time grows with the rows, so ``DENSE_FROM_ROWS`` rows or more (prefill, batches) run oneDNN on a
  packed copy of the dequantized weight, bfloat16 where the CPU computes it natively (else float32), with the
  same bfloat16 rounding of input and output.
- Quantized, below the dense copy's rows, where the CPU has AVX-512 VNNI: the input is rounded to int8 per 32
  and multiplied by the weight codes in integers (``kernels.linear.vnni``), reading the weights at memory
  speed; PyTorch's weight-only kernels are not kept then.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.backend import LinearKernel
from kernels.compiled import cpu_flags, cpuinfo
from kernels.linear import panels, vnni
from kernels.linear.formats import INT4_GROUP, SCALE_DTYPE, QuantizedWeight, dequantize

ONEDNN_BATCH_HINT = 16  # the row count oneDNN lays the weight out for; one layout serves every row count
# Dense matmuls of this many rows or more run oneDNN, by CPU vendor. F.linear's matrix-vector product is MKL's,
# tuned for Intel: `benchmarks/linears.py`, all of a SmolLM2 step's linears, fp32, F.linear vs oneDNN ms, on a
# 2-core AVX-512 Xeon 26.8 vs 33.8 at 1 row, 30.1 vs 36.1 at 2, 52.2 vs 37.1 at 4; on a 2-core AMD EPYC (Zen 5)
# 33.5 vs 12.0 at 1 row, 59.2 vs 11.4 at 2 (docs/benchmarks.md). Other CPUs keep the Xeon's threshold.
PACKED_FROM_ROWS = {"AuthenticAMD": 1}
PACKED_FROM_ROWS_ELSEWHERE = 4
# Quantized matmuls of this many rows or more (a prefill chunk, a batch) run oneDNN on a packed copy of the
# dequantized weight: the weight-only kernels' time grows with the rows, a matmul's much less. By the copy's
# dtype; all of a SmolLM2 step's linears, weight-only vs oneDNN ms (`benchmarks/linears.py --quantization ...`,
# 2-core AVX-512 BF16 Xeon, docs/benchmarks.md): bfloat16 copy, int4 18.2 vs 16.7 at 8 rows, 32.7 vs 17.4 at
# 16, 217.4 vs 32.4 at 128; int8 30.7 vs 17.4 at 8. float32 copy (no native bfloat16), int4 without the head
# 32.3 vs 41.4 at 24 rows, 80.7 vs 73.5 at 64; int8 75.4 vs 58.4 at 32.
DENSE_FROM_ROWS = {torch.bfloat16: 8, torch.float32: 64}
# With the VNNI kernel (read at memory speed, its time growing with the rows faster than oneDNN's), quantized
# weights run their bfloat16 dense copy from more rows. All of a SmolLM2 step's linears (int4 without the head),
# weight-only / VNNI / oneDNN ms, `benchmarks/linears.py --quantization ...`, 2-core AMD EPYC (Zen 5): int4 3.8 /
# 2.6 / 8.5 at 1 row, 7.9 / 7.1 / 9.4 at 7, 11.0 / 11.1 / 10.3 at 12; int8 8.0 / 4.2 / 9.1 at 1, 16.7 / 9.8 /
# 10.9 at 16, 29.0 / 17.1 / 16.0 at 32 (docs/benchmarks.md). A float32 copy keeps DENSE_FROM_ROWS.
VNNI_DENSE_FROM_ROWS = {("int4", torch.bfloat16): 12, ("int8", torch.bfloat16): 32}


@dataclass(frozen=True)
class _Dense:
    weight: Tensor  # [N, K] as loaded
    packed: Tensor | None  # oneDNN's blocked copy of it, for packed_from_rows() rows or more
    panels: Tensor | None = None  # [N/16, K, 16]: the C kernel's copy, for every row count, in place of oneDNN's


@dataclass(frozen=True)
class _Packed:
    scheme: str
    weight: Tensor | None  # int8 [N, K] | int4: uint8 [N, K / 2] in the kernel's own layout; None with vnni
    scales: Tensor | None  # int8 [N] | int4 [K / G, N, 2] (scale, zero), SCALE_DTYPE; None with vnni
    out_features: int
    dense: Tensor | None  # oneDNN's blocked copy of the dequantized weight (bfloat16 or float32), for DENSE_FROM_ROWS
    vnni: vnni.VnniWeight | None = None  # the int8-activation kernel's form, for the rows below the dense copy's

    def dense_from(self) -> int:
        """Rows from which the dense copy runs."""
        rows = DENSE_FROM_ROWS[self.dense.dtype]
        return VNNI_DENSE_FROM_ROWS.get((self.scheme, self.dense.dtype), rows) if self.vnni else rows


def cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"); "" where there is none."""
    return cpuinfo("vendor_id")


@functools.cache
def packed_from_rows() -> int:
    """Rows from which a dense weight's matmul runs on its oneDNN copy, on this CPU."""
    return PACKED_FROM_ROWS.get(cpu_vendor(), PACKED_FROM_ROWS_ELSEWHERE)


def onednn_packs(weight: Tensor) -> bool:
    """Whether a dense weight is reordered for oneDNN: on the CPU, in a build with oneDNN, float32, or
    bfloat16 where the CPU computes it natively."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (
        weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@functools.cache
def native_bf16() -> bool:
    """Whether oneDNN multiplies bfloat16 in hardware here (AVX-512 BF16 or AMX). It reports bfloat16 support on
    any AVX-512 CPU and emulates it there: a [128, 576] x [576, 3072] matmul on a 2-core Xeon without either
    took 9.6 ms in bfloat16, 2.7 ms in float32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _dense_copy(weight: QuantizedWeight) -> Tensor | None:
    """oneDNN's packed copy of what the codes mean: in bfloat16 where the CPU computes it natively (the input
    is bfloat16 already; the weight rounds at most half a bfloat16 step), else float32; None without oneDNN."""
    dense = dequantize(weight)  # [N, K] float32
    if native_bf16():
        dense = dense.to(SCALE_DTYPE)
    return torch.ops.mkldnn._reorder_linear_weight(dense, ONEDNN_BATCH_HINT) if onednn_packs(dense) else None


class CpuLinearKernel(LinearKernel):
    name = "cpu"
    int8_activations = True  # the VNNI kernel where the CPU has it

    def prepare(self, weight: Tensor | QuantizedWeight) -> _Dense | _Packed:
        if not isinstance(weight, QuantizedWeight):
            if panels.fits(weight) and panels.library() is not None:
                return _Dense(weight, None, panels.pack(weight))
            if not onednn_packs(weight):
                return _Dense(weight, None)
            return _Dense(weight, torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ONEDNN_BATCH_HINT))
        n = weight.shape[0]
        if weight.q.device.type != "cpu":
            raise ValueError(f"quantization: the CPU kernels take CPU weights, not {weight.q.device.type}")
        dense = _dense_copy(weight)
        if self.int8_activations and vnni.fits(weight.shape) and vnni.library() is not None:
            return _Packed(weight.scheme, None, None, n, dense, vnni.pack(weight))
        if weight.scheme == "int8":
            return _Packed("int8", weight.q.contiguous(), weight.scale.contiguous(), n, dense)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)  # [N, K/2]
        scales = torch.stack([weight.scale, weight.zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
        return _Packed("int4", packed, scales, n, dense)

    def linear(self, x: Tensor, prepared: _Dense | _Packed, bias: Tensor | None) -> Tensor:
        if isinstance(prepared, _Dense):
            if prepared.panels is not None and x.dtype == torch.float32:
                return panels.linear(x, prepared.panels, bias)
            if prepared.packed is None or x.numel() < packed_from_rows() * x.shape[-1]:
                return F.linear(x, prepared.weight, bias)
            return torch.ops.mkldnn._linear_pointwise(x, prepared.packed, bias, "none", [], "")  # [..., N]
        # every op is a dispatch on one stream's decode path, where dispatches are most of a step: none for nothing
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # [M, K]
        dense = prepared.dense is not None and x2.shape[0] >= prepared.dense_from()
        if prepared.vnni is not None and not dense:
            y = vnni.linear(x2, prepared.vnni, bias).to(x.dtype)  # [M, N]
            return y if x.dim() == 2 else y.view(*x.shape[:-1], prepared.out_features)
        x2 = x2.to(SCALE_DTYPE)
        if dense:
            x2 = x2.to(prepared.dense.dtype)
            y = torch.ops.mkldnn._linear_pointwise(x2, prepared.dense, None, "none", [], "")  # [M, N]
            y = y.to(SCALE_DTYPE)  # rounded as the weight-only kernels round their output
        elif prepared.scheme == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, prepared.weight, prepared.scales)  # [M, N]
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, prepared.weight, INT4_GROUP, prepared.scales)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], prepared.out_features)

    def silu_and_mul(self, x: Tensor, prepared: _Dense | _Packed, bias: Tensor | None) -> Tensor:
        form = prepared.panels if isinstance(prepared, _Dense) and x.dtype == torch.float32 else None
        if form is not None and form.shape[0] % 2 == 0:  # each gate panel has its up panel I rows on
            return panels.gated(x, form, bias)
        return super().silu_and_mul(x, prepared, bias)


class CpuWeightOnlyLinearKernel(CpuLinearKernel):
    """``cpu`` without the VNNI kernel: PyTorch's weight-only kernels on bfloat16 activations, the path before
    it, to measure against."""

    name = "cpu_weight_only"
    int8_activations = False
