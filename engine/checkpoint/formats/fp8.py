"""FP8 checkpoints (``quantization_config.quant_method == "fp8"``), dequantized at load.

The layout is transformers' fine-grained FP8 (DeepSeek-V3 style), which is how
Mistral Small 4 ships: a ``float8_e4m3fn`` tensor ``X`` has a float32 sibling
``X_scale_inv`` (``....weight`` -> ``....weight_scale_inv``; fused experts
``...experts.gate_up_proj`` -> ``...experts.gate_up_proj_scale_inv``), one
scale per ``weight_block_size`` block of its last two dims, or one scale for
the whole tensor. ``w[..., i, j] = fp8[..., i, j] * scale_inv[..., i // b0, j // b1]``;
edge blocks are partial. Activation scales (``input_scale``,
``activation_scale``) only matter to an FP8 matmul: with weights dequantized
to the compute dtype they are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.checkpoint.files import ModelLoadError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # the scale rule is the same for both
SCALE_SUFFIX = "_scale_inv"
_ACTIVATION_SCALES = (".input_scale", ".activation_scale")
_FORMATS = ("e4m3", "float8_e4m3fn")


@dataclass(frozen=True)
class Fp8Scheme:
    block: tuple[int, int] | None  # (rows, cols) per scale; None: one scale per tensor


def fp8_scheme(hf: dict) -> Fp8Scheme | None:
    """The FP8 scheme of a config dict, None when it is not quantized; ModelLoadError if unsupported."""
    q = hf.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise ModelLoadError("config.json: quantization_config must be an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ModelLoadError(f"config.json: quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt not in _FORMATS:
        raise ModelLoadError(f"config.json: quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    block = q.get("weight_block_size")
    if block is None:
        return Fp8Scheme(None)
    if not (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ModelLoadError(
            f"config.json: quantization_config.weight_block_size must be two positive integers, got {block!r}"
        )
    return Fp8Scheme((block[0], block[1]))


def is_scale_name(name: str) -> bool:
    """A tensor consumed by dequantization (or unused by it), never loaded as a parameter."""
    return name.endswith(SCALE_SUFFIX) or name.endswith(_ACTIVATION_SCALES)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def dequantize(name: str, weight: Tensor, scale: Tensor, scheme: Fp8Scheme, dtype: torch.dtype) -> Tensor:
    """``weight`` [..., R, C] in FP8 times its ``scale`` (one, or [..., ceil(R/b0), ceil(C/b1)]), in ``dtype``."""
    if not scale.is_floating_point():
        raise ModelLoadError(
            f"scale tensor {name + SCALE_SUFFIX!r} has dtype {scale.dtype}; only floating-point scales are supported"
        )
    w = weight.float()  # [..., R, C]
    s = scale.float()
    if s.numel() == 1:  # per-tensor scale: a scalar or [1]
        return (w * s.reshape(())).to(dtype)
    if scheme.block is None or w.dim() < 2:
        raise ModelLoadError(
            f"scale tensor {name + SCALE_SUFFIX!r} has shape {tuple(s.shape)}, but config.json's "
            f"quantization_config has no weight_block_size"
        )
    b0, b1 = scheme.block
    rows, cols = w.shape[-2:]
    expected = (*w.shape[:-2], _cdiv(rows, b0), _cdiv(cols, b1))
    if tuple(s.shape) != expected:
        raise ModelLoadError(
            f"scale tensor {name + SCALE_SUFFIX!r} has shape {tuple(s.shape)}, expected {expected} "
            f"for {name!r} of shape {tuple(w.shape)} in {b0}x{b1} blocks"
        )
    # every element gets its block's scale; the last block of a dim may be partial
    s = s.repeat_interleave(b0, dim=-2)[..., :rows, :].repeat_interleave(b1, dim=-1)[..., :cols]  # [..., R, C]
    return (w * s).to(dtype)
