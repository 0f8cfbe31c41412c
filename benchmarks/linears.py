"""Every linear of one decode step of the embedded model, timed at several row counts: ``F.linear`` on the
weights as loaded against oneDNN's packed copy of them (``kernels/linear/cpu.py``), and the rate this
machine reads memory at, which bounds a one-row step.

    .venv/bin/python benchmarks/linears.py --rows 1,2,4,16,2048

Best of 5 passes over all the step's linears in model order (fused QKV, output, fused gate/up, down,
then the output head; ``--no-head`` leaves the head out, as a prefill step that samples from the last
rows only mostly does), 2 threads.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from engine.checkpoint.gguf import default_gguf_path
from engine.config import ModelConfig
from engine.native.models.loader import load_model
from engine.native.models.prepare import linears_of


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,16,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-head", action="store_true", help="leave the output head out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(default_gguf_path(), ModelConfig(num_threads=args.threads))
    linears = [lin for lin in linears_of(model) if lin.prepared is not None]
    if args.no_head:
        linears = [lin for lin in linears if lin is not model.lm_head]
    forms = [lin.prepared.form for lin in linears]
    megabytes = sum(f.weight.numel() * 4 for f in forms) / 1e6
    print(f"{len(forms)} linears, {megabytes:.0f} MB of float32 weights; memory read {read_rate():.1f} GB/s")
    print(f"{'rows':>6}{'F.linear ms':>14}{'oneDNN ms':>12}")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(rows, k) for k in {f.weight.shape[1] for f in forms}}
        plain = best_of(5, partial(_plain, forms, inputs))
        packed = best_of(5, partial(_packed, forms, inputs))
        print(f"{rows:>6}{plain * 1e3:>14.1f}{packed * 1e3:>12.1f}")


if __name__ == "__main__":
    main()
