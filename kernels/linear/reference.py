"""The reference linears (the spec, not fast). Dense: a plain ``F.linear``. Quantized: dequantize once, then
a plain float32 matmul of the input rounded to bfloat16, its output rounded to bfloat16 too, as the CPU
kernels give it."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kernels.backend import LinearKernel
from kernels.linear.formats import SCALE_DTYPE, QuantizedWeight, dequantize


@dataclass(frozen=True)
class _Reference:
    weight: Tensor  # [N, K]: as given (dense) or dequantized to float32
    quantized: bool


class ReferenceLinearKernel(LinearKernel):
    name = "reference"

    def prepare(self, weight: Tensor | QuantizedWeight) -> _Reference:
        if isinstance(weight, QuantizedWeight):
            return _Reference(dequantize(weight), quantized=True)
        return _Reference(weight, quantized=False)

    def linear(self, x: Tensor, prepared: _Reference, bias: Tensor | None) -> Tensor:
        if not prepared.quantized:
            return F.linear(x, prepared.weight, bias)
        y = F.linear(x.to(SCALE_DTYPE).float(), prepared.weight).to(SCALE_DTYPE).to(x.dtype)  # [..., N]
        return y if bias is None else y + bias
