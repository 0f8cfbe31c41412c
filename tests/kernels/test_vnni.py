"""The int8-activation VNNI linears: the C kernel against its torch reference, the input's rounding, the
CPU kernel's choice of it by rows, and the build that falls back to PyTorch's kernels when it cannot run."""

from __future__ import annotations

import logging

import pytest
import torch

from kernels import compiled
from kernels.backend import get_linear_kernel
from kernels.linear import vnni
from kernels.linear.formats import INT4_GROUP, dequantize, quantize

needs_vnni = pytest.mark.skipif(
    vnni.library() is None, reason="this CPU or machine cannot run the VNNI kernel (AVX-512 VNNI and cc needed)"
)


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture
def fresh_library():
    """``vnni.library()`` decided anew in the test, and again after it."""
    vnni.library.cache_clear()
    yield
    vnni.library.cache_clear()


@needs_vnni
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 16, 64), (1, 96, 576), (2, 48, 1536), (5, 64, 256), (9, 32, 576)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernel_matches_its_reference(scheme, rows, n, k, with_bias):
    qw = quantize(weight(n, k), scheme)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n) if with_bias else None
    got, want = vnni.linear(x, vnni.pack(qw), bias), vnni.reference(x, qw, bias)  # [rows, N]
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # integer dot products are exact: only float32 summation order differs
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@needs_vnni
def test_an_int8_weight_with_a_row_count_no_int4_packing_takes():
    qw = quantize(weight(20, 128), "int8")  # 20 rows: not a multiple of 16
    x = torch.randn(3, 128)
    assert torch.allclose(vnni.linear(x, vnni.pack(qw), None), vnni.reference(x, qw, None), atol=1e-5, rtol=1e-5)


def test_the_input_rounds_to_127_steps_of_its_groups_largest_magnitude():
    x = torch.randn(3, 4 * INT4_GROUP)
    x[0, :INT4_GROUP] = 0.0  # an all-zero group stays zero
    got = vnni.round_input(x).view(3, 4, INT4_GROUP)
    groups = x.view(3, 4, INT4_GROUP)
    step = groups.abs().amax(dim=-1, keepdim=True) / 127
    assert torch.equal(got[0, 0], torch.zeros(INT4_GROUP))
    assert ((got - groups).abs() <= step / 2 + 1e-7).all()
    codes = torch.where(step > 0, got / step, torch.zeros_like(got))
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4
    assert torch.allclose(got.abs().amax(dim=-1), groups.abs().amax(dim=-1))  # the largest is exact


def test_a_pairs_lanes_alternate_its_two_groups():
    order = vnni.PAIR_ORDER.tolist()
    assert sorted(order) == list(range(2 * INT4_GROUP))
    for lane in range(16):
        inputs = order[4 * lane : 4 * lane + 4]
        assert {i // INT4_GROUP for i in inputs} == {lane % 2}  # even lanes the first group, odd the second
        assert inputs == list(range(inputs[0], inputs[0] + 4))


@needs_vnni
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_cpu_kernel_runs_it_below_the_dense_copys_rows(scheme, onednn_calls, monkeypatch):
    qw = quantize(weight(64, 128), scheme)
    cpu = get_linear_kernel("cpu")
    form = cpu.prepare(qw)
    assert form.vnni is not None and form.weight is None and form.scales is None  # PyTorch's forms not kept
    calls = []
    real = vnni.linear
    monkeypatch.setattr(vnni, "linear", lambda *a: calls.append(1) or real(*a))
    for rows in (1, form.dense_from() - 1, form.dense_from()):
        x = torch.randn(rows, 128)
        assert cpu.linear(x, form, None).shape == (rows, 64)
    assert len(calls) == 2 and len(onednn_calls) == (form.dense is not None)


@needs_vnni
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_kernel_stays_within_its_inputs_rounding_of_the_reference(scheme, dtype):
    n, k = 96, 256
    qw = quantize(weight(n, k).to(dtype), scheme)
    x, bias = torch.randn(2, 3, k).to(dtype), torch.randn(n).to(dtype)
    ref, cpu = get_linear_kernel("reference"), get_linear_kernel("cpu")
    got, want = cpu.linear(x, cpu.prepare(qw), bias), ref.linear(x, ref.prepare(qw), bias)  # [2, 3, N]
    assert got.shape == (2, 3, n) and got.dtype == dtype
    # each input moves at most half its step; the reference's bfloat16 input and output round too
    steps = x.float().view(-1, k // INT4_GROUP, INT4_GROUP).abs().amax(dim=-1, keepdim=True) / 127
    moved = (steps / 2 + x.float().view_as(steps.expand(-1, -1, INT4_GROUP)).abs() * 2**-8).view(6, k)
    bound = moved @ dequantize(qw).abs().t() + want.float().abs().view(6, n) * 2**-7  # [6, N]
    assert ((got.float() - want.float()).view(6, n).abs() <= bound + 1e-4).all()


@pytest.mark.parametrize("shape", [(64, 96), (30, 128)])  # inputs not whole pairs; rows not whole blocks
def test_shapes_it_cannot_take_run_pytorchs_kernels(shape):
    qw = quantize(weight(*shape), "int8")
    form = get_linear_kernel("cpu").prepare(qw)
    assert not vnni.fits(shape) and form.vnni is None and form.weight is not None


def test_without_the_library_the_cpu_kernel_runs_pytorchs(monkeypatch, fresh_library, caplog):
    monkeypatch.setattr(compiled, "cpu_flags", lambda: {"avx2"})
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        assert vnni.library() is None
    assert "VNNI linears off" in caplog.text and "avx512_vnni" in caplog.text
    qw = quantize(weight(64, 128), "int4")
    form = get_linear_kernel("cpu").prepare(qw)
    assert form.vnni is None and form.weight is not None
    x = torch.randn(1, 128)
    want = get_linear_kernel("reference").linear(x, get_linear_kernel("reference").prepare(qw), None)
    assert torch.allclose(get_linear_kernel("cpu").linear(x, form, None), want, atol=1e-3, rtol=2**-7)


@needs_vnni
def test_its_output_is_made_beside_its_input_whatever_the_default_device():
    qw, x = quantize(weight(32, 64), "int8"), torch.randn(1, 64)
    with torch.device("meta"):  # an output made on the default device would be meta: no memory to write
        got = vnni.linear(x, vnni.pack(qw), None)
    assert got.device.type == "cpu" and torch.allclose(got, vnni.reference(x, qw, None), atol=1e-5, rtol=1e-5)
