"""The reference quantized linear: dequantize once, then a plain float32 matmul of the input rounded to
bfloat16, its output rounded to bfloat16 too, as the CPU kernels give it (the spec, not fast)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kernels.backend import LinearKernel
from kernels.quant.formats import SCALE_DTYPE, QuantizedWeight, dequantize


class ReferenceLinearKernel(LinearKernel):
    name = "reference"

    def prepare(self, weight: QuantizedWeight) -> Tensor:
        return dequantize(weight)  # [N, K] float32

    def linear(self, x: Tensor, prepared: Tensor, bias: Tensor | None) -> Tensor:
        y = F.linear(x.to(SCALE_DTYPE).float(), prepared).to(SCALE_DTYPE).to(x.dtype)  # [..., N]
        return y if bias is None else y + bias
