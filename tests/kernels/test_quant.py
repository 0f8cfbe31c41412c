"""Weight-only quantized linears: the formats' own rules, and each kernel against the reference."""

from __future__ import annotations

import pytest
import torch

from kernels.backend import get_linear_kernel
from kernels.quant.formats import INT4_GROUP, SCALE_DTYPE, dequantize, fits, quantize


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def q4_1_grid(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as GGUF's Q4_1 stores it: per 32-weight block, ``m + d * q`` with q in 0..15, both ends used."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // INT4_GROUP, 1, generator=g) + 0.1).half().float() * 0.01
    m = (torch.randn(n, k // INT4_GROUP, 1, generator=g) * 0.05).half().float()
    return (m + d * q).view(n, k), q.view(n, k)


def scale_err(w: torch.Tensor) -> float:
    return w.abs().max().item() * 2**-8  # the bfloat16 scales and zeros round at this


def test_int8_is_per_row_symmetric_within_half_a_step():
    w = weight(48, 96)
    qw = quantize(w, "int8")
    assert qw.q.dtype == torch.int8 and qw.q.shape == (48, 96) and qw.scale.shape == (48,) and qw.zero is None
    assert qw.scale.dtype == SCALE_DTYPE
    assert int(qw.q.abs().amax(dim=1).min()) >= 126  # each row's largest weight uses the whole range
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((dequantize(qw) - w).abs() <= step / 2 + scale_err(w)).all()


def test_int4_groups_span_their_own_range_within_half_a_step():
    w = weight(32, 128)
    qw = quantize(w, "int4")
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) == 15 and int(qw.q.min()) == 0
    assert qw.scale.shape == qw.zero.shape == (32, 128 // INT4_GROUP)
    groups = w.view(32, -1, INT4_GROUP)
    step = (groups.amax(dim=2) - groups.amin(dim=2)) / 15  # [N, K/G]
    err = (dequantize(qw) - w).view(32, -1, INT4_GROUP).abs().amax(dim=2)
    assert (err <= step / 2 + 2 * scale_err(w)).all()


def test_a_weight_on_q4_1s_grid_gets_its_own_codes_back():
    w, codes = q4_1_grid(16, 64)
    qw = quantize(w, "int4")
    assert torch.equal(qw.q, codes.to(torch.uint8))
    assert (dequantize(qw) - w).abs().max() <= 2 * scale_err(w)


def test_a_flat_group_and_an_unpackable_shape():
    w = torch.zeros(16, 64)
    w[:, 32:] = 0.25  # two flat groups per row
    assert torch.equal(dequantize(quantize(w, "int4")), w)
    assert fits("int8", (30, 48)) and not fits("int4", (30, 64)) and not fits("int4", (32, 48))
    with pytest.raises(ValueError, match="quantization: a \\(30, 64\\) weight does not fit int4"):
        quantize(torch.zeros(30, 64), "int4")
    with pytest.raises(ValueError, match="quantization: must be one of"):
        quantize(w, "int3")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3)])
def test_the_cpu_kernel_matches_the_reference(scheme, dtype, lead):
    n, k = 96, 256
    qw = quantize(weight(n, k).to(dtype), scheme)
    bias = torch.randn(n).to(dtype)
    x = torch.randn(*lead, k).to(dtype)
    ref, cpu = get_linear_kernel("reference"), get_linear_kernel("cpu")
    want = ref.linear(x, ref.prepare(qw), bias)  # [*lead, N]
    got = cpu.linear(x, cpu.prepare(qw), bias)
    assert got.shape == (*lead, n) and got.dtype == dtype
    # the same bfloat16 output, up to float32 accumulation order: at most one bfloat16 step apart
    assert torch.allclose(got.float(), want.float(), atol=1e-3, rtol=2**-7), (got - want).abs().max()


def test_an_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="unknown linear backend 'gpu'; choices: \\['cpu', 'reference'\\]"):
        get_linear_kernel("gpu")
