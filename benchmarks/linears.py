"""Every linear of one decode step of the embedded model, timed at several row counts: ``F.linear`` on the
weights as loaded against oneDNN's packed copy of them and our C kernel's panels (``kernels/linear/cpu.py``,
``kernels/linear/panels.py``, where it builds), and the rate this machine reads memory at, which bounds a
one-row step.

    .venv/bin/python benchmarks/linears.py --rows 1,2,4,16,2048
    .venv/bin/python benchmarks/linears.py --quantization int4 --rows 1,4,8,16,32,128

With ``--quantization`` PyTorch's weight-only int8/int4 kernels, the int8-activation VNNI kernel
(``kernels/linear/vnni.py``, where the CPU has it) and oneDNN on the dequantized copy (bfloat16 where the CPU
computes it, else float32) are timed on the same weights: ``kernels/linear/cpu.py`` chooses among them by rows.

Best of 5 passes over all the step's linears in model order (fused QKV, output, fused gate/up, down,
then the output head; ``--no-head`` leaves the head out, as a prefill step that samples from the last
rows only mostly does), 2 threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial

import torch
import torch.nn.functional as F

from engine.checkpoint.gguf import default_gguf_path
from engine.config import ModelConfig
from engine.native.models.loader import load_model
from engine.native.models.prepare import linears_of
from kernels.linear import panels, vnni
from kernels.linear.cpu import ONEDNN_BATCH_HINT, CpuWeightOnlyLinearKernel
from kernels.linear.formats import INT4_GROUP, SCALE_DTYPE, quantize


def best_of(passes: int, fn, warmups: int = 1) -> float:
    for _ in range(warmups):
        fn()
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_rate() -> float:
    """GB/s of a sum over 256 MB, the way a one-row matmul reads its weight."""
    big = torch.randn(64 * 1024 * 1024)
    return big.numel() * 4 / best_of(3, big.sum) / 1e9


def _plain(forms: list, inputs: dict) -> None:
    for f in forms:
        F.linear(inputs[f.weight.shape[1]], f.weight)  # [rows, N]


def _packed(forms: list, inputs: dict) -> None:
    for f in forms:
        torch.ops.mkldnn._linear_pointwise(inputs[f.weight.shape[1]], f.packed, None, "none", [], "")  # [rows, N]


def _panels(forms: list, inputs: dict) -> None:
    for f in forms:
        panels.linear(inputs[f.weight.shape[1]], f.panels, None)  # [rows, N]


def _in_features(f) -> int:
    return f.weight.shape[1] * (2 if getattr(f, "scheme", None) == "int4" else 1)  # int4: two codes a byte


def _weight_only(forms: list, inputs: dict) -> None:
    """The int8/int4 kernels, as ``kernels/linear/cpu.py`` runs them below ``DENSE_FROM_ROWS`` rows."""
    for f in forms:
        x = inputs[_in_features(f)].to(SCALE_DTYPE)  # [rows, K]
        if f.scheme == "int8":
            torch.ops.aten._weight_int8pack_mm(x, f.weight, f.scales)  # [rows, N]
        else:
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, f.weight, INT4_GROUP, f.scales)  # [rows, N]


def _vnni(forms: list, inputs: dict) -> None:
    """The int8-activation kernel, as ``kernels/linear/cpu.py`` runs it where the CPU has AVX-512 VNNI."""
    for f in forms:
        vnni.linear(inputs[_in_features(f)], f.vnni, None)  # [rows, N]


def _dense_copy(forms: list, inputs: dict) -> None:
    """oneDNN on the dequantized copy (bfloat16 where the CPU computes it), from ``DENSE_FROM_ROWS`` rows up."""
    for f in forms:
        x = inputs[_in_features(f)].to(SCALE_DTYPE).to(f.dense.dtype)  # [rows, K]
        torch.ops.mkldnn._linear_pointwise(x, f.dense, None, "none", [], "").to(SCALE_DTYPE)  # [rows, N]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,16,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-head", action="store_true", help="leave the output head out")
    ap.add_argument("--quantization", default="none", help="int8 or int4: the weight-only kernel against oneDNN")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig(num_threads=args.threads, quantization=args.quantization)
    model, _ = load_model(default_gguf_path(), config)
    linears = [lin for lin in linears_of(model) if lin.prepared is not None]
    if args.no_head:
        linears = [lin for lin in linears if lin is not model.lm_head]
    forms = [_forms(lin) for lin in linears]
    weights = f"{sum(f.weight.numel() * f.weight.element_size() for f in forms) / 1e6:.0f} MB of {args.quantization}"
    print(f"{len(forms)} linears, {weights} weights; memory read {read_rate():.1f} GB/s")
    columns = {"F.linear": _plain, "oneDNN": _packed}
    if args.quantization == "none" and all(f.panels is not None for f in forms):
        columns["panels"] = _panels
    if args.quantization != "none":
        has_vnni = all(f.vnni is not None for f in forms)
        columns = {"weight-only": _weight_only} | ({"VNNI": _vnni} if has_vnni else {}) | {"oneDNN": _dense_copy}
    print(f"{'rows':>6}" + "".join(f"{name + ' ms':>16}" for name in columns))
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(rows, k) for k in {_in_features(f) for f in forms}}
        times = [best_of(5, partial(fn, forms, inputs)) for fn in columns.values()]
        print(f"{rows:>6}" + "".join(f"{t * 1e3:>16.1f}" for t in times))


def _forms(lin):
    """A dense linear's prepared form with both copies, oneDNN's and the panels where the C kernel builds; a
    quantized one's PyTorch-kernel form with its VNNI form beside it."""
    form = lin.prepared.form
    if lin.prepared.scheme == "none":
        packed = torch.ops.mkldnn._reorder_linear_weight(form.weight.contiguous(), ONEDNN_BATCH_HINT)
        has_panels = panels.fits(form.weight) and panels.library() is not None
        return dataclasses.replace(form, packed=packed, panels=panels.pack(form.weight) if has_panels else None)
    qw = quantize(lin.weight, lin.prepared.scheme)
    torch_form = CpuWeightOnlyLinearKernel().prepare(qw)
    has_vnni = vnni.fits(qw.shape) and vnni.library() is not None
    return dataclasses.replace(torch_form, vnni=vnni.pack(qw) if has_vnni else None)


if __name__ == "__main__":
    main()
