"""Building blocks whose fast path must give the numbers of the plain one (transformers' op order)."""

from __future__ import annotations

import pytest
import torch

from engine.native.models.layers import RMSNorm
from kernels.norm import rms


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (2048, 576), (3, 7, 96)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_fused_float32_rms_norm_gives_the_plain_steps_numbers(shape, scale, monkeypatch):
    monkeypatch.setattr(rms, "library", lambda: None)  # PyTorch's fused op, as where the C kernel cannot run
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-5)
    norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = torch.randn(*shape, generator=g) * scale
    # bit for bit on the AVX-512 machine this was written on; a float32 rounding step elsewhere
    torch.testing.assert_close(norm(x), plain_rms_norm(x, norm.weight, 1e-5), rtol=3e-7, atol=0)


def _needs_c_norm() -> None:
    if rms.library() is None:
        pytest.skip("the C RMSNorm cannot run on this machine (the warning above says why)")


@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (2048, 576), (3, 7, 96), (2, 5)])  # 5: a masked tail
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_c_rms_norm_and_its_residual_add_give_the_plain_steps_numbers(shape, scale):
    _needs_c_norm()
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-5)
    norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x, residual = torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale
    # the mean of squares summed in another order: a few float32 rounding steps
    torch.testing.assert_close(norm(x), plain_rms_norm(x, norm.weight, 1e-5), rtol=1e-6, atol=0)
    total, normed = norm.add(x, residual)
    assert torch.equal(total, residual + x)
    torch.testing.assert_close(normed, plain_rms_norm(residual + x, norm.weight, 1e-5), rtol=1e-6, atol=0)
    assert torch.equal(normed, norm(residual + x)) and torch.equal(
        rms.reference(x, norm.weight, 1e-5), plain_rms_norm(x, norm.weight, 1e-5)
    )


def test_rows_the_c_rms_norm_cannot_take_run_pytorchs():
    norm = RMSNorm(64, eps=1e-6)
    norm.weight.copy_(torch.randn(64))
    x = torch.randn(64, 5).t()  # [5, 64], not contiguous
    assert not rms.fits(x, norm.weight) and not rms.fits(x.bfloat16(), norm.weight)
    total, normed = norm.add(x, torch.ones(5, 64))
    assert torch.equal(total, x + 1) and torch.equal(normed, norm(total))


def test_a_bfloat16_rms_norm_keeps_the_plain_steps():
    norm = RMSNorm(64, eps=1e-6, dtype=torch.bfloat16)
    norm.weight.copy_(torch.randn(64).bfloat16())
    x = torch.randn(5, 64).bfloat16()
    assert torch.equal(norm(x), plain_rms_norm(x, norm.weight, 1e-6))
