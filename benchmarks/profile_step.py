"""Where Levante's decode time goes: torch's profiler over one ``LLM.generate`` on the embedded model.

    .venv/bin/python benchmarks/profile_step.py --batch 1
    .venv/bin/python benchmarks/profile_step.py --batch 16
    .venv/bin/python benchmarks/profile_step.py --batch 16 --linear-backend reference   # F.linear: the path before
    .venv/bin/python benchmarks/profile_step.py --batch 1 --versus cpu_weight_only --rounds 8 --quantization int4   # an A/B, no profiler
    .venv/bin/python benchmarks/profile_step.py --batch 16 --versus-attention cpu_sdpa --rounds 8   # the same, attention
    .venv/bin/python benchmarks/profile_step.py --batch 16 --versus-without-panels --rounds 6   # C linears/experts off
    .venv/bin/python benchmarks/profile_step.py --batch 16 --model 'tiny:mixtral?seed=0'   # another model

Random prompts of 128 token ids, 64 greedy tokens with end-of-sequence ignored, 2 threads, prefix
caching off (the workload of ``benchmarks/peers.py``). Prints the unprofiled and profiled times, the share of the
wall time that torch's ops account for (the rest is Python: scheduling, inputs, outputs), and the
ops with the most self time; our C kernels are listed among them as ``levante::... (C)``. With ``--versus``
(``--versus-attention``) it profiles nothing: a second engine with that linear (attention) backend loads beside
the first, the two take turns at ``--rounds`` generate calls, and it prints each one's best and median tokens/s
and whether their tokens agree (one process, so load changes on a shared machine fall on both).
``--versus-without-panels`` does the same against an engine loaded as on a CPU without the C float32 linears
and routed experts (``kernels/*/panels.py``): oneDNN and F.linear.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

from engine.checkpoint.folder import resolve_model_dir
from engine.checkpoint.gguf import default_gguf_path
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core.request import SamplingParams
from engine.llm import LLM
from kernels.attention import decode
from kernels.linear import panels as linear_panels
from kernels.moe import panels as moe_panels
from kernels.norm import rms

C_KERNELS = (
    (decode, "paged_decode", "levante::paged_decode (C)"),
    (linear_panels, "linear", "levante::panel_linear (C)"),
    (linear_panels, "gated", "levante::panel_gated (C)"),
    (moe_panels, "fused_moe", "levante::routed_experts (C)"),
    (rms, "rms_norm", "levante::rms_norm (C)"),
    (rms, "add_rms_norm", "levante::add_rms_norm (C)"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1, help="prompts in one generate call")
    ap.add_argument("--model", help="a model folder, .gguf file or tiny: URI (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="ops listed")
    ap.add_argument("--linear-backend", default="cpu", help="model.linear_backend (reference: F.linear)")
    ap.add_argument("--attention-backend", default="cpu", help="model.attention_backend")
    ap.add_argument("--quantization", default="none", help="model.quantization: none, int8 or int4")
    ap.add_argument("--dtype", default="float32", help="model.dtype: float32 or bfloat16")
    ap.add_argument("--versus", help="another model.linear_backend to take turns with, unprofiled")
    ap.add_argument("--versus-attention", help="another model.attention_backend to take turns with, unprofiled")
    ap.add_argument("--versus-without-panels", action="store_true", help="take turns with the C float32 kernels off")
    ap.add_argument("--rounds", type=int, default=6, help="generate calls each, with --versus")
    args = ap.parse_args()
    rng = random.Random(0)
    vocab = json.loads((Path(resolve_model_dir(args.model or default_gguf_path())) / "config.json").read_text())
    prompts = [[rng.randrange(100, vocab["vocab_size"]) for _ in range(128)] for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    if args.versus or args.versus_attention or args.versus_without_panels:
        return versus(args, prompts, params)
    llm = _llm(args, (args.linear_backend, args.attention_backend), prompts)
    start = time.perf_counter()
    llm.generate(prompts, params)
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof, _named_c_kernels():
        start = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - start
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    in_ops = sum(e.self_cpu_time_total for e in ops) / 1e6
    print(f"batch {args.batch}: {plain:.2f}s unprofiled ({args.batch * 64 / plain:.1f} tok/s), {wall:.2f}s profiled")
    print(f"torch ops: {in_ops:.2f}s ({100 * in_ops / wall:.0f}% of the profiled wall time)")
    for e in ops[: args.top]:
        share = 100 * e.self_cpu_time_total / 1e6 / wall
        print(f"  {e.key:<52}{e.self_cpu_time_total / 1e6:8.3f}s {share:5.1f}%  {e.count} calls")


@contextlib.contextmanager
def _named_c_kernels() -> Iterator[None]:
    """Our C kernels listed among torch's ops (a ctypes call is invisible to the profiler)."""
    originals = [(module, attr, getattr(module, attr)) for module, attr, _ in C_KERNELS]

    def named(real: Callable[..., object], label: str) -> Callable[..., object]:
        def call(*args: object) -> object:
            with record_function(label):
                return real(*args)

        return call

    for (module, attr, real), (_, _, label) in zip(originals, C_KERNELS):
        setattr(module, attr, named(real, label))
    try:
        yield
    finally:
        for module, attr, real in originals:
            setattr(module, attr, real)


@contextlib.contextmanager
def _without_panels() -> Iterator[None]:
    """Engines loaded inside take the path of a CPU without the C float32 linears and routed experts."""
    originals = [(module, module.library) for module in (linear_panels, moe_panels)]
    for module, _ in originals:
        module.library = lambda: None
    try:
        yield
    finally:
        for module, real in originals:
            module.library = real


def _llm(args: argparse.Namespace, backends: tuple[str, str], prompts: list[list[int]]) -> LLM:
    config = EngineConfig(
        model=ModelConfig(
            model=args.model or default_gguf_path(),
            num_threads=args.threads,
            linear_backend=backends[0],
            attention_backend=backends[1],
            quantization=args.quantization,
            dtype=args.dtype,
        ),
        scheduler=SchedulerConfig(max_num_seqs=max(args.batch, 1)),
        cache=CacheConfig(enable_prefix_caching=False),  # each run computes its prompts: the peers' workload
    )
    llm = LLM(config=config)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up at full batch
    return llm


def versus(args: argparse.Namespace, prompts: list[list[int]], params: SamplingParams) -> None:
    first = (args.linear_backend, args.attention_backend)
    second = (args.versus or args.linear_backend, args.versus_attention or args.attention_backend)
    names = ["/".join(first), "/".join(second) + (" without panels" if args.versus_without_panels else "")]
    llms = {names[0]: _llm(args, first, prompts)}
    with _without_panels() if args.versus_without_panels else contextlib.nullcontext():
        llms[names[1]] = _llm(args, second, prompts)
    rates: dict[str, list[float]] = {name: [] for name in llms}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, llm in llms.items():
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            rates[name].append(len(prompts) * params.max_tokens / (time.perf_counter() - start))
            tokens[name] = [list(o.token_ids) for o in outputs]
    for name, r in rates.items():
        print(
            f"{name:<28} best {max(r):6.1f} tok/s, median {statistics.median(r):6.1f}: {' '.join(f'{x:.1f}' for x in r)}"
        )
    print("same tokens:", tokens[names[0]] == tokens[names[1]])


if __name__ == "__main__":
    main()
