"""Weight-only quantized formats: what the stored numbers mean. ``dequantize`` is the spec every kernel is
tested against.

- ``int8``: one scale per output row, symmetric: ``w = q * scale`` with ``q`` in [-127, 127].
- ``int4``: one scale and one zero per group of ``INT4_GROUP`` inputs of a row, asymmetric:
  ``w = (q - 8) * scale + zero`` with ``q`` in [0, 15] (PyTorch's CPU int4 kernel's convention).
  A group spans its own range, min to max, as GGUF's Q4_1 does over its 32-weight blocks: a
  weight dequantized from Q4_1 gets its own codes back, so the embedded model's linears run as
  they ship (up to the scales' rounding).

Scales and zeros are bfloat16, and a quantized linear reads its input and gives its output in
bfloat16 (accumulating in float32): PyTorch's CPU weight-only kernels are vectorized for bfloat16
activations only (with float32 ones they are ten times slower than a float32 matmul here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCHEMES = ("int8", "int4")
INT4_GROUP = 32  # GGUF's Q4_0 / Q4_1 block size
INT4_ROWS = 16  # PyTorch's CPU int4 packing takes a row count that is a multiple of this
SCALE_DTYPE = torch.bfloat16  # of scales, zeros and the activations a quantized linear reads


@dataclass(frozen=True)
class QuantizedWeight:
    scheme: str  # one of SCHEMES
    q: Tensor  # int8 [N, K] | int4: uint8 [N, K], values 0..15
    scale: Tensor  # int8 [N] | int4 [N, K / INT4_GROUP], SCALE_DTYPE
    zero: Tensor | None = None  # int4 [N, K / INT4_GROUP], SCALE_DTYPE

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


def fits(scheme: str, shape: tuple[int, int]) -> bool:
    """Whether a ``[N, K]`` weight can be stored in ``scheme`` (int4 needs whole groups and packable rows)."""
    n, k = shape
    return scheme == "int8" or (k % INT4_GROUP == 0 and n % INT4_ROWS == 0)


def quantize(weight: Tensor, scheme: str) -> QuantizedWeight:
    """weight: [N, K] float -> its ``scheme`` form (codes from the rounded scales, so they agree)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization: must be one of {SCHEMES}, got {scheme!r}")
    if not fits(scheme, tuple(weight.shape)):
        raise ValueError(f"quantization: a {tuple(weight.shape)} weight does not fit {scheme}")
    w = weight.detach().float()
    if scheme == "int8":
        scale = _rounded(w.abs().amax(dim=1).clamp_min(1e-30) / 127)  # [N]
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
        return QuantizedWeight(scheme, q, scale.to(SCALE_DTYPE))
    groups = w.view(w.shape[0], -1, INT4_GROUP)  # [N, K/G, G]
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)  # [N, K/G]
    scale = _rounded(torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo)))  # a flat group: q = 0
    zero = _rounded(lo + 8 * scale)  # so that (q - 8) * scale + zero = lo + q * scale
    q = torch.round((groups - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp_(0, 15)  # [N, K/G, G]
    return QuantizedWeight(scheme, q.to(torch.uint8).view(w.shape), scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE))


def _rounded(t: Tensor) -> Tensor:
    return t.to(SCALE_DTYPE).float()


def dequantize(qw: QuantizedWeight) -> Tensor:
    """-> [N, K] float32."""
    if qw.scheme == "int8":
        return qw.q.float() * qw.scale.float()[:, None]
    n, k = qw.shape
    q = qw.q.float().view(n, -1, INT4_GROUP)  # [N, K/G, G]
    return ((q - 8) * qw.scale.float()[..., None] + qw.zero.float()[..., None]).view(n, k)
