"""Quantized linears on PyTorch's CPU weight-only kernels: ``_weight_int8pack_mm`` (int8 weights, one scale
per row) and ``_weight_int4pack_mm_for_cpu`` (int4 weights packed two to a byte, a scale and a zero per
group). Both read bfloat16 activations (their vectorized path) and accumulate in float32; the weights are
read at a quarter or an eighth of fp32's bytes, which is what a decode step on CPU is bound by."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.backend import LinearKernel
from kernels.quant.formats import INT4_GROUP, SCALE_DTYPE, QuantizedWeight


@dataclass(frozen=True)
class _Packed:
    scheme: str
    weight: Tensor  # int8 [N, K] | int4: uint8 [N, K / 2] in the kernel's own layout
    scales: Tensor  # int8 [N] | int4 [K / G, N, 2] (scale, zero), SCALE_DTYPE
    out_features: int


class CpuLinearKernel(LinearKernel):
    name = "cpu"

    def prepare(self, weight: QuantizedWeight) -> _Packed:
        n = weight.shape[0]
        if weight.q.device.type != "cpu":
            raise ValueError(f"quantization: the CPU kernels take CPU weights, not {weight.q.device.type}")
        if weight.scheme == "int8":
            return _Packed("int8", weight.q.contiguous(), weight.scale.contiguous(), n)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)  # [N, K/2]
        scales = torch.stack([weight.scale, weight.zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
        return _Packed("int4", packed, scales, n)

    def linear(self, x: Tensor, prepared: _Packed, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(SCALE_DTYPE)  # [M, K]
        if prepared.scheme == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, prepared.weight, prepared.scales)  # [M, N]
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, prepared.weight, INT4_GROUP, prepared.scales)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], prepared.out_features)
