"""Whole prompts' attention on the CPU backend: its C kernel, row by row, against the SDPA path (``cpu_sdpa``).

    .venv/bin/python benchmarks/attention_prompts.py --lens 128,512,1024,2048
    .venv/bin/python benchmarks/attention_prompts.py --lens 128,512,1024,2048 --heads 16,1,576,512   # MLA's latent

Where this crosses over is where ``CpuAttentionBackend(kernel_area=...)`` sends a chunk to SDPA instead.
Each length runs ``--prompts`` prompts of that length as one prefill step, in blocks of 16 shuffled over the
cache, both backends taking turns (best of ``--rounds``), 2 threads. ``--heads`` is query heads, kv heads, key
width, value width (SmolLM2's by default; with one kv head and a value narrower than the key, V is the
first features of K, as MLA's latent cache is). Prints milliseconds per prompt, the ratio, and the largest
difference between the two.
"""

from __future__ import annotations

import argparse
import time

import torch

from kernels.attention.cpu import CpuAttentionBackend, CpuSdpaAttentionBackend
from kernels.attention.decode import library
from kernels.metadata import AttentionMetadata

BLOCK = 16


def _batch(length: int, prompts: int, heads: tuple[int, int, int, int], gen: torch.Generator):
    hq, hkv, d, dv = heads
    per = -(-length // BLOCK)
    order = torch.randperm(per * prompts, generator=gen).tolist()
    blocks = [order[i * per : (i + 1) * per] for i in range(prompts)]
    meta = AttentionMetadata.build(BLOCK, [length] * prompts, [length] * prompts, blocks)
    k = torch.randn(per * prompts, BLOCK, hkv, d, generator=gen)  # [NB, BS, Hkv, D]
    v = k[..., :dv] if hkv == 1 and dv < d else torch.randn(per * prompts, BLOCK, hkv, dv, generator=gen)
    q = torch.randn(length * prompts, hq, d, generator=gen)  # [T, Hq, D]
    return q, k, v, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", default="128,512,1024,2048", help="prompt lengths")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--heads", default="9,3,64,64", help="query heads, kv heads, key width, value width")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if library() is None:
        raise SystemExit("the C kernel does not run on this machine (AVX-512 and a C compiler needed)")
    torch.set_num_threads(args.threads)
    heads = tuple(int(x) for x in args.heads.split(","))
    kernel, sdpa = CpuAttentionBackend(kernel_area=1 << 62), CpuSdpaAttentionBackend()
    print(f"heads {heads}, {args.prompts} prompts a step; ms per prompt, best of {args.rounds}")
    print(f"{'length':>7} {'kernel':>9} {'sdpa':>9} {'sdpa/kernel':>12} {'max diff':>9}")
    for length in (int(x) for x in args.lens.split(",")):
        q, k, v, meta = _batch(length, args.prompts, heads, torch.Generator().manual_seed(length))
        best, outs = {"kernel": float("inf"), "sdpa": float("inf")}, {}
        for _ in range(args.rounds):
            for name, backend in (("kernel", kernel), ("sdpa", sdpa)):
                meta.derived.clear()  # plans are per step: each call builds its own
                start = time.perf_counter()
                out = backend.paged_attention(q, k, v, meta, heads[2] ** -0.5)
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3 / args.prompts)
                outs[name] = out
        diff = (outs["kernel"] - outs["sdpa"]).abs().max().item()
        ratio = best["sdpa"] / best["kernel"]
        print(f"{length:>7} {best['kernel']:>9.2f} {best['sdpa']:>9.2f} {ratio:>11.2f}x {diff:>9.1e}")


if __name__ == "__main__":
    main()
