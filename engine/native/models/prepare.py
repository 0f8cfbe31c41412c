"""Every linear a model runs handed, after load, to the ``LinearKernel`` of ``model.linear_backend``, which
holds its weight in its own form: dense as loaded (the CPU kernel packs float32 weights for oneDNN), or
weight-only quantized under ``model.quantization``.

``int8`` stores each linear at one byte a weight with a scale per output row; ``int4`` at half a
byte with a scale and a zero per 32 inputs (``kernels.linear.formats``). Under ``int4`` a linear
whose shape the int4 kernel cannot pack, and the output head (``QUANTIZE_INT8``), run ``int8``.
Linears a model reads directly, the parts of a fused linear, and MoE routers (``QUANTIZE_NONE``)
stay as loaded; so do the routed experts' stacked weights, which the MoE backend runs in its own form
(``prepare_experts``: the CPU backend's oneDNN-packed copies where dense matmuls run oneDNN from one row).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from torch import nn

from engine.native.models.layers import (
    QUANTIZE_INT8,
    QUANTIZE_NONE,
    FusedLinear,
    Linear,
    PreparedLinear,
    RoutedMoE,
)
from kernels.backend import LinearKernel
from kernels.linear.formats import fits, quantize


def linears_of(model: nn.Module) -> Iterator[Linear | FusedLinear]:
    """Every ``Linear`` and ``FusedLinear`` of the model, in module order."""
    for module in model.modules():
        if isinstance(module, Linear):
            yield module
        yield from (v for v in vars(module).values() if isinstance(v, FusedLinear))


def prepare_linears(model: nn.Module, scheme: str, kernel: LinearKernel) -> Counter[str]:
    """Hand the model's linears to ``kernel`` in place, quantized under ``scheme`` ("none": dense);
    how many went to each scheme."""
    counts: Counter[str] = Counter()
    for linear in linears_of(model):
        if linear.quantize_as == QUANTIZE_NONE or linear.prepared is not None:
            continue
        if scheme == "none":
            linear.prepared = PreparedLinear(kernel, linear.weight, linear.bias)
            counts["none"] += 1
            continue
        shape = tuple(linear.weight.shape)
        chosen = scheme if linear.quantize_as != QUANTIZE_INT8 and fits(scheme, shape) else "int8"
        linear.prepared = PreparedLinear(kernel, quantize(linear.weight, chosen), linear.bias)
        counts[chosen] += 1
    return counts


def prepare_experts(model: nn.Module) -> int:
    """Hand each MoE layer's routed experts to its backend's ``prepare``, in place; how many layers."""
    layers = [m for m in model.modules() if isinstance(m, RoutedMoE)]
    for moe in layers:
        moe.experts.prepared = moe.moe_backend.prepare(moe.experts.gate_up_proj, moe.experts.down_proj)
    return len(layers)
