"""The CPU flash kernel that long prefill runs on (``kernels/attention/tiled.py``), timed by head width:
one chunk of queries against one key tile, no mask, float32 and bfloat16.

    .venv/bin/python benchmarks/attention_width.py --widths 8,16,17,24,32,48

The tiny Mistral 4's long prefill attends per head over 24 features (16 without position, 8 with),
with V (16) padded to that width, so this says what a narrower or a bfloat16 kernel would gain there.
Best of 5 calls after 2 warm-up calls, 2 threads.
"""

from __future__ import annotations

import argparse

import torch
from linears import best_of  # this folder is on sys.path when the script runs


def time_tile(heads: int, queries: int, keys: int, width: int, dtype: torch.dtype) -> float:
    q = torch.randn(1, heads, queries, width, dtype=dtype)  # [1, H, Q, D]
    k = torch.randn(1, heads, keys, width, dtype=dtype)  # [1, H, K, D]
    v = torch.randn(1, heads, keys, width, dtype=dtype)  # [1, H, K, D]: the kernel wants V as wide as K
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return best_of(5, lambda: flash(q, k, v, 0.0, False, scale=width**-0.5), warmups=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="8,16,17,24,32,48", help="comma list of head widths (features)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--queries", type=int, default=2048, help="the chunk: the engine's default step budget")
    ap.add_argument("--keys", type=int, default=8192, help="the key tile: the cpu backend's default")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = args.heads * args.queries * args.keys
    print(f"{args.heads} heads x {args.queries} queries x {args.keys} keys, no mask, {args.threads} threads")
    print(f"{'width':>6}{'float32 ms':>12}{'Gpairs/s':>10}{'bfloat16 ms':>13}{'Gpairs/s':>10}")
    for width in (int(w) for w in args.widths.split(",")):
        f32, bf16 = (time_tile(args.heads, args.queries, args.keys, width, d) for d in (torch.float32, torch.bfloat16))
        print(f"{width:>6}{f32 * 1e3:>12.1f}{pairs / f32 / 1e9:>10.2f}{bf16 * 1e3:>13.1f}{pairs / bf16 / 1e9:>10.2f}")


if __name__ == "__main__":
    main()
