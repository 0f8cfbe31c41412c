"""``model.quantization``: every linear a model runs swapped, after load, for a weight-only quantized one.

``int8`` stores each linear at one byte a weight with a scale per output row; ``int4`` at half a
byte with a scale and a zero per 32 inputs (``kernels.quant.formats``). Under ``int4`` a linear
whose shape the int4 kernel cannot pack, and the output head (``QUANTIZE_INT8``), run ``int8``.
Linears a model reads directly, the parts of a fused linear, and MoE routers (``QUANTIZE_NONE``)
stay as loaded; so do the routed experts' stacked weights, which the MoE backend runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from torch import nn

from engine.native.models.layers import QUANTIZE_INT8, QUANTIZE_NONE, FusedLinear, Linear, QuantizedLinear
from kernels.backend import LinearKernel
from kernels.quant.formats import fits, quantize


def _linears(model: nn.Module) -> Iterator[Linear | FusedLinear]:
    for module in model.modules():
        if isinstance(module, Linear):
            yield module
        yield from (v for v in vars(module).values() if isinstance(v, FusedLinear))


def quantize_linears(model: nn.Module, scheme: str, kernel: LinearKernel) -> Counter[str]:
    """Quantize the model's linears in place; how many went to each scheme."""
    counts: Counter[str] = Counter()
    for linear in _linears(model):
        if linear.quantize_as == QUANTIZE_NONE or linear.quantized is not None:
            continue
        shape = tuple(linear.weight.shape)
        chosen = scheme if linear.quantize_as != QUANTIZE_INT8 and fits(scheme, shape) else "int8"
        linear.quantized = QuantizedLinear(kernel, quantize(linear.weight, chosen), linear.bias)
        counts[chosen] += 1
    return counts
