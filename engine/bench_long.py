"""``levante bench-long``: one long prompt, the attention path before tiling against the tiled one.

Each run (a length and an attention backend) is a fresh ``python -m engine.bench_long`` child, so
its peak RSS (``VmHWM``) is its own: the parent only reads the child's one JSON line. A run loads the
native engine with ``model.attention_backend`` set, sizes the KV cache to what the sequence needs
(so the cache does not dominate RSS), and times ``LLM.generate`` of one random prompt with a few
greedy tokens. The old path is skipped above ``--old-up-to`` (it gathers the whole context per layer
per chunk, so its time grows with the square of the length), with the reason printed.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

CHILD_FLAG = "--child"


@dataclass(frozen=True)
class LongRun:
    """One child's settings (its argv, as JSON)."""

    model: str
    length: int
    max_tokens: int
    backend: str  # ModelConfig.attention_backend
    chunk: int  # SchedulerConfig.max_num_batched_tokens
    threads: int | None


@dataclass
class LongResult:
    backend: str
    length: int
    seconds: float  # LLM.generate of the one prompt
    load_s: float
    peak_rss_bytes: int  # the child's VmHWM
    kv_bytes: int  # KV cache bytes the sequence needs (its blocks times bytes per block)
    tokens: list[int]


def default_model(lengths: list[int], max_tokens: int) -> str:
    """The tiny Mistral 4 (MLA, YaRN), with positions for the longest run."""
    return f"tiny:mistral4?seed=0&vocab_size=32768&max_position_embeddings={max(lengths) + max_tokens + 64}"


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def run_child(run: LongRun) -> LongResult:
    """In the child: load, size the cache, time one generate."""
    from pathlib import Path

    from engine.checkpoint.folder import read_config, resolve_model_dir
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from engine.core.kv_cache import cdiv
    from engine.core.request import SamplingParams
    from engine.llm import LLM

    start = time.perf_counter()
    block_size = 16
    blocks = cdiv(run.length + run.max_tokens, block_size)
    cfg = EngineConfig(
        model=ModelConfig(model=run.model, attention_backend=run.backend, num_threads=run.threads),
        cache=CacheConfig(block_size=block_size, num_blocks=blocks + 1),  # +1: the null block
        scheduler=SchedulerConfig(max_num_batched_tokens=run.chunk),
    )
    llm = LLM(config=cfg)
    load_s = time.perf_counter() - start
    vocab = int(read_config(Path(resolve_model_dir(run.model)))["vocab_size"])
    rng = random.Random(0)
    prompt = [rng.randrange(3, vocab) for _ in range(run.length)]
    params = SamplingParams(temperature=0, max_tokens=run.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    (out,) = llm.generate([prompt], params)
    seconds = time.perf_counter() - start
    kv_bytes = blocks * llm.engine.stats().kv_bytes_per_block
    return LongResult(run.backend, run.length, seconds, load_s, _vm_hwm(), kv_bytes, list(out.token_ids))


def spawn(run: LongRun) -> LongResult:
    """One run in a fresh interpreter; its result is the last line it prints."""
    cmd = [sys.executable, "-m", "engine.bench_long", CHILD_FLAG, json.dumps(asdict(run))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ChildProcessError(f"bench-long run {run.backend} at {run.length} tokens failed: {tail}")
    return LongResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _print_run(r: LongResult) -> None:
    print(
        f"{r.length:>8} {r.backend:<12} {r.seconds:>9.1f} s {_gb(r.peak_rss_bytes):>10} peak RSS "
        f"{_mb(r.kv_bytes):>9} KV   (load {r.load_s:.1f} s)",
        flush=True,
    )


def _compare(old: LongResult, new: LongResult) -> None:
    same = "identical" if old.tokens == new.tokens else f"DIFFERENT ({old.tokens} vs {new.tokens})"
    print(f"{new.length:>8} speed-up {old.seconds / new.seconds:.1f}x ({old.backend} / {new.backend}); tokens {same}")


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--lengths: expected comma-separated token counts such as 65536,262144, got {text!r}"
        ) from None
    if not lengths or any(n < 2 for n in lengths):
        raise ValueError(f"--lengths: each length must be at least 2, got {text!r}")
    return lengths


def run(args) -> int:
    lengths = parse_lengths(args.lengths)
    model = args.model or default_model(lengths, args.max_tokens)
    print(f"model {model}; {args.max_tokens} greedy tokens; prefill chunk {args.chunk}; torch threads {args.threads}")
    print(f"{'tokens':>8} {'attention':<12} {'time':>11} {'peak RSS':>19} {'KV':>12}")
    results = []
    for length in lengths:
        runs = {}
        for backend in (args.old_backend, args.new_backend):
            if backend == args.old_backend and length > args.old_up_to:
                print(
                    f"{length:>8} {backend:<12} skipped: above --old-up-to {args.old_up_to} (the old path's time "
                    f"grows with the square of the length; pass --old-up-to {length} to run it)",
                    flush=True,
                )
                continue
            r = spawn(LongRun(model, length, args.max_tokens, backend, args.chunk, args.threads))
            _print_run(r)
            runs[backend] = r
            results.append(r)
        if len(runs) == 2:
            _compare(runs[args.old_backend], runs[args.new_backend])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "chunk": args.chunk, "runs": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
    print(json.dumps(asdict(run_child(LongRun(**json.loads(sys.argv[2]))))))
