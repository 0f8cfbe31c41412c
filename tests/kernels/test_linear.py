"""Linears: the quantized formats' own rules, and each kernel against the reference, dense and quantized."""

from __future__ import annotations

import pytest
import torch

from kernels.backend import get_linear_kernel
from kernels.linear import panels
from kernels.linear.cpu import native_bf16, onednn_packs, packed_from_rows
from kernels.linear.formats import INT4_GROUP, SCALE_DTYPE, dequantize, fits, quantize


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
def test_pytorchs_weight_only_kernels_match_the_reference(scheme, dtype, lead):
    n, k = 96, 256
    qw = quantize(weight(n, k).to(dtype), scheme)
    bias = torch.randn(n).to(dtype)
    x = torch.randn(*lead, k).to(dtype)
    ref, cpu = get_linear_kernel("reference"), get_linear_kernel("cpu_weight_only")
    want = ref.linear(x, ref.prepare(qw), bias)  # [*lead, N]
    got = cpu.linear(x, cpu.prepare(qw), bias)
    assert got.shape == (*lead, n) and got.dtype == dtype
    # the same bfloat16 output, up to float32 accumulation order: at most one bfloat16 step apart
    assert torch.allclose(got.float(), want.float(), atol=1e-3, rtol=2**-7), (got - want).abs().max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("offset", [-1, 0, 66])
def test_a_quantized_weight_runs_its_dequantized_copy_from_dense_from_rows(scheme, offset, onednn_calls):
    n, k = 96, 256
    qw = quantize(weight(n, k), scheme)
    ref, cpu = get_linear_kernel("reference"), get_linear_kernel("cpu")
    form = cpu.prepare(qw)
    assert form.dense is not None
    rows = form.dense_from() + offset
    x, bias = torch.randn(rows, k), torch.randn(n)

    got, want = cpu.linear(x, form, bias), ref.linear(x, ref.prepare(qw), bias)  # [rows, N]
    assert len(onednn_calls) == (offset >= 0)  # a weight-only kernel below, oneDNN from there
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # Where the CPU computes bfloat16 the copy is bfloat16: each weight rounds by half a bfloat16 step, and the
    # sums' errors follow the products' size, not the sum's: within 2**-6 of the largest output (the outputs'
    # own bfloat16 rounding alone is 2**-8 of it).
    assert form.dense.dtype == (torch.bfloat16 if native_bf16() else torch.float32)
    assert (got - want).abs().max() <= 2**-6 * (want - bias).abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("lead", [(1,), (3,), (4,), (16,), (300,), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_cpu_kernel_packs_a_dense_float32_weight_and_matches_f_linear(lead, with_bias, onednn_calls):
    n, k = 200, 96  # neither a multiple of oneDNN's blocks
    w, x = weight(n, k), torch.randn(*lead, k)
    bias = torch.randn(n) if with_bias else None
    cpu = get_linear_kernel("cpu")
    form = cpu.prepare(w)
    assert torch.backends.mkldnn.is_available() and form.packed is not None and onednn_packs(w)
    want = get_linear_kernel("reference").linear(x, get_linear_kernel("reference").prepare(w), bias)
    assert torch.equal(want, torch.nn.functional.linear(x, w, bias))  # the reference is F.linear

    got = cpu.linear(x, form, bias)
    assert got.shape == (*lead, n) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()  # summation order only
    assert len(onednn_calls) == (x.numel() // k >= packed_from_rows())  # the packed weight from this CPU's threshold up


@pytest.mark.parametrize(("vendor", "rows"), [("AuthenticAMD", 1), ("GenuineIntel", 4), ("", 4)])
def test_the_packed_weight_runs_from_the_cpu_vendors_threshold(vendor, rows, as_vendor, onednn_calls, monkeypatch):
    monkeypatch.setattr(panels, "library", lambda: None)  # a CPU without the C kernel: oneDNN and F.linear
    as_vendor(vendor)
    assert packed_from_rows() == rows
    w, cpu = weight(64, 48), get_linear_kernel("cpu")
    form = cpu.prepare(w)
    for n in (rows - 1, rows):
        assert cpu.linear(torch.randn(n, 48), form, None).shape == (n, 64)
    assert len(onednn_calls) == 1  # below the threshold F.linear, at it oneDNN


def _needs_panels() -> None:
    if panels.library() is None:
        pytest.skip("the C float32 linears cannot run on this machine (the warning above says why)")


@pytest.mark.parametrize("lead", [(1,), (3,), (8,), (9,), (17,), (300,), (2, 3)])  # 300: more than one chunk
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("n", [48, 64, 80])  # panels: a group of three; then one more; then two more
def test_panels_run_a_float32_weight_of_whole_panels_and_match_f_linear(lead, with_bias, n, onednn_calls):
    _needs_panels()
    k = 96
    w, x = weight(n, k), torch.randn(*lead, k)
    bias = torch.randn(n) if with_bias else None
    cpu = get_linear_kernel("cpu")
    form = cpu.prepare(w)
    assert form.panels is not None and form.packed is None and form.weight is w
    got = cpu.linear(x, form, bias)
    assert got.shape == (*lead, n) and got.dtype == torch.float32 and onednn_calls == []
    want = torch.nn.functional.linear(x, w, bias)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()  # summation order only


def swiglu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    gate, up = torch.nn.functional.linear(x, w, bias).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("lead", [(1,), (5,), (16,), (300,), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("n", [32, 96])  # [gate; up] of 16 and 48 rows: one and three panel pairs
def test_panels_run_a_swiglus_gate_and_up_gated_and_match_f_linear_then_silu(lead, with_bias, n):
    _needs_panels()
    w, x = weight(n, 64), torch.randn(*lead, 64)
    bias = torch.randn(n) if with_bias else None
    cpu = get_linear_kernel("cpu")
    got = cpu.silu_and_mul(x, cpu.prepare(w), bias)
    assert got.shape == (*lead, n // 2) and got.dtype == torch.float32
    want = swiglu(x, w, bias)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("backend", ["reference", "cpu", "cpu_weight_only"])
@pytest.mark.parametrize("n", [48, 200])  # panels that do not pair up; no panels
def test_every_kernel_runs_silu_and_mul_as_its_linear_then_the_two_ops(backend, n):
    w, x, bias = weight(n * 2, 64), torch.randn(3, 64), torch.randn(n * 2)
    kernel = get_linear_kernel(backend)
    assert torch.allclose(kernel.silu_and_mul(x, kernel.prepare(w), bias), swiglu(x, w, bias), atol=1e-5, rtol=1e-5)
    odd = weight(48, 64)  # three panels: no up panel for the last gate one
    assert torch.allclose(kernel.silu_and_mul(x, kernel.prepare(odd), None), swiglu(x, odd, None), atol=1e-5)


def test_panels_lay_each_output_in_its_lane_and_take_only_whole_panels():
    w = torch.arange(48 * 32, dtype=torch.float32).view(48, 32)
    packed = panels.pack(w)
    assert packed.shape == (3, 32, 16) and packed[2, 5, 7] == w[2 * 16 + 7, 5]
    assert panels.fits(w) and not panels.fits(w[:40]) and not panels.fits(w[:, :24]) and not panels.fits(w.bfloat16())
    assert get_linear_kernel("cpu").prepare(weight(200, 96)).panels is None


def test_the_cpu_kernel_reads_a_strided_input_as_f_linear_does():
    w, x = weight(64, 48), torch.randn(48, 10).t()  # [10, 48], not contiguous
    cpu = get_linear_kernel("cpu")
    assert torch.allclose(cpu.linear(x, cpu.prepare(w), None), x @ w.t(), atol=1e-5)


@pytest.mark.parametrize("rows", [1, 16])
def test_a_bfloat16_weight_is_packed_where_the_cpu_computes_bfloat16(rows):
    w, x = weight(48, 64).bfloat16(), torch.randn(rows, 64).bfloat16()
    cpu = get_linear_kernel("cpu")
    form = cpu.prepare(w)
    assert (form.packed is not None) == torch.ops.mkldnn._is_mkldnn_bf16_supported() == onednn_packs(w)
    got, want = cpu.linear(x, form, None), torch.nn.functional.linear(x, w)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=1e-2, rtol=2**-7)  # one bfloat16 step at most


def test_a_float16_weight_is_left_as_loaded_for_f_linear():
    w = weight(32, 64).half()
    form = get_linear_kernel("cpu").prepare(w)
    assert form.packed is None and form.weight is w and not onednn_packs(w)


def test_an_unknown_kernel_is_named():
    with pytest.raises(
        ValueError, match="unknown linear backend 'gpu'; choices: \\['cpu', 'cpu_weight_only', 'reference'\\]"
    ):
        get_linear_kernel("gpu")
